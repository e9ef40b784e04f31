"""The one configuration object of a load run, built by `echoplex load` or by hand.

Units are part of the field names, as in `ServerConfig`. The transport fields
(`unix_path`, `tls`, `send_proxy`, `udp`) mirror `echoplex client`'s options; how each
transport connects is `echoplex.load.transport`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._net import check_host, check_unix_path
from ..config import DEFAULT_PORT, LOOPS

PATTERNS: dict[str, str] = {
    "pingpong": "closed loop: each connection sends --size bytes, waits for all of them "
    "back, repeats",
    "rate": "open loop at --rate messages/s in all, sent on schedule whatever comes back; "
    "latency from each message's intended send time",
    "stream": "each connection keeps --window bytes in flight: bulk throughput",
    "hold": "open -c connections, one round trip each, hold them idle for --duration, "
    "one more round trip: how many stay alive",
}
MAX_CONNECTIONS = 100_000
MAX_SIZE_BYTES = 1 << 30
MAX_DATAGRAM_BYTES = 65_507  # the most one UDP datagram carries over IPv4
PROXY_VERSIONS = ("v1", "v2")
# UDP has neither a byte stream to keep a window of bytes in flight on, nor
# connections to hold open and check later: only the message patterns apply.
UDP_PATTERNS = ("pingpong", "rate")


@dataclass(frozen=True)
class LoadConfig:
    host: str = "127.0.0.1"
    """Server to load; a name is resolved once, before the first connect."""

    port: int = DEFAULT_PORT
    """Server port, 1..65535."""

    pattern: str = "pingpong"
    """A key of `PATTERNS`."""

    connections: int = 10
    """Connections opened (and, for `rate`, sharing the rate)."""

    size_bytes: int = 1024
    """Bytes in one message: a ping-pong, a scheduled send, a stream chunk, a hold check."""

    duration_s: float = 10.0
    """Measured time after the warmup; for `hold`, how long connections stay idle."""

    warmup_s: float = 0.0
    """Traffic before the measured time, left out of every figure (not used by `hold`)."""

    rate_per_s: float | None = None
    """`rate` only: messages per second in all, spread evenly over the connections."""

    window_bytes: int = 256 * 1024
    """`stream` only: bytes in flight per connection (at least one message)."""

    connect_rate_per_s: float | None = None
    """New connections per second while opening; None opens them as fast as they come up."""

    timeout_s: float = 10.0
    """A connect, or an echo that makes no progress, fails after this long; also how long
    the end of a run waits for echoes still in flight. With `udp`, a datagram whose echo
    has not come back this long after it was sent counts as lost (`echoplex load --udp`
    defaults to 2 seconds, as `echoplex client --udp` does)."""

    seed: int = 0
    """Seed of the payload bytes."""

    loop: str = "auto"
    """Event loop: auto (uvloop if installed), asyncio, uvloop."""

    unix_path: str | None = None
    """Connect to this Unix domain socket instead of host:port."""

    tls: bool = False
    """Speak TLS over each connection, verifying the server as `host`."""

    ca_file: str | None = None
    """With `tls`: verify the server against this CA file (default: the system's CAs)."""

    tls_insecure: bool = False
    """With `tls`: verify nothing (testing only)."""

    send_proxy: str | None = None
    """`v1` or `v2`: each connection starts with a PROXY protocol header naming itself,
    sent before TLS, as HAProxy's send-proxy does."""

    udp: bool = False
    """UDP echo: each connection is a connected UDP socket, each message one datagram
    (pingpong and rate only; at most MAX_DATAGRAM_BYTES)."""

    @property
    def transport(self) -> str:
        """What carries the bytes: udp, tls (over TCP, or over `unix_path` if set), unix
        or tcp."""
        if self.udp:
            return "udp"
        if self.tls:
            return "tls"
        return "unix" if self.unix_path else "tcp"

    @property
    def target(self) -> str:
        """Where the load goes, as the summary shows it: `127.0.0.1:7`, `unix:/run/e.sock`,
        `udp 127.0.0.1:7`, `tls 127.0.0.1:7 with PROXY v2`."""
        where = f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"
        if self.udp or self.tls:
            where = f"{self.transport} {where}"
        return f"{where} with PROXY {self.send_proxy}" if self.send_proxy else where

    def __post_init__(self) -> None:
        problems = []
        if self.pattern not in PATTERNS:
            problems.append(f"unknown pattern {self.pattern!r} (choose from {', '.join(PATTERNS)})")
        if not 1 <= self.port <= 65535:
            problems.append(f"port must be 1..65535, not {self.port}")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            problems.append(f"connections must be 1..{MAX_CONNECTIONS}, not {self.connections}")
        if not 1 <= self.size_bytes <= MAX_SIZE_BYTES:
            problems.append(f"size must be 1..{MAX_SIZE_BYTES} bytes, not {self.size_bytes}")
        if not 0 < self.duration_s < float("inf"):
            problems.append(f"duration must be more than 0 seconds, not {self.duration_s}")
        if not 0 <= self.warmup_s < float("inf"):
            problems.append(f"warmup must be 0 seconds or more, not {self.warmup_s}")
        if not 0 < self.timeout_s < float("inf"):
            problems.append(f"timeout must be more than 0 seconds, not {self.timeout_s}")
        if self.window_bytes < 1:
            problems.append(f"window must be at least 1 byte, not {self.window_bytes}")
        if self.pattern == "rate":
            if self.rate_per_s is None:
                problems.append("--pattern rate needs --rate MESSAGES_PER_S")
            elif not 0 < self.rate_per_s < float("inf"):
                problems.append(f"rate must be more than 0 messages/s, not {self.rate_per_s}")
        elif self.rate_per_s is not None:
            problems.append("--rate applies only to --pattern rate")
        if self.connect_rate_per_s is not None and not 0 < self.connect_rate_per_s < float("inf"):
            problems.append(
                f"connect rate must be more than 0 connections/s, not {self.connect_rate_per_s}"
            )
        if self.loop not in LOOPS:
            problems.append(f"loop must be one of {', '.join(LOOPS)}, not {self.loop!r}")
        problems += self._transport_problems()
        if problems:
            raise ValueError(problems[0])

    def _transport_problems(self) -> list[str]:
        problems = []
        if (self.ca_file or self.tls_insecure) and not self.tls:
            problems.append("--ca and --insecure go with --tls")
        if self.send_proxy is not None and self.send_proxy not in PROXY_VERSIONS:
            problems.append(f"--send-proxy must be v1 or v2, not {self.send_proxy!r}")
        for check, value in ((check_host, self.host), (check_unix_path, self.unix_path)):
            try:
                if value is not None:
                    check(value)
            except ValueError as exc:
                problems.append(str(exc))
        if not self.udp:
            return problems
        if self.tls or self.unix_path is not None or self.send_proxy is not None:
            problems.append("--udp does not go with --tls, --unix or --send-proxy")
        if self.pattern not in UDP_PATTERNS:
            why = (
                "UDP has no byte stream to keep a window of bytes in flight on"
                if self.pattern == "stream"
                else "UDP has no connections to hold open"
            )
            problems.append(
                f"--pattern {self.pattern} does not go with --udp: {why} "
                f"(use {' or '.join(UDP_PATTERNS)})"
            )
        if self.size_bytes > MAX_DATAGRAM_BYTES:
            problems.append(
                f"with --udp, size must be 1..{MAX_DATAGRAM_BYTES} bytes (one datagram), "
                f"not {self.size_bytes}"
            )
        return problems
