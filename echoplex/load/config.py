"""The one configuration object of a load run, built by `echoplex load` or by hand.

Units are part of the field names, as in `ServerConfig`. The transport fields
(`unix_path`, `tls`, `send_proxy`, `udp`) mirror `echoplex client`'s options; how each
transport connects is `echoplex.load.transport`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from .._cli_util import (
    FromOtherSettings,
    at_most,
    binary_size,
    described,
    file_path,
    host_name,
    non_negative_seconds,
    option,
    positive_int,
    positive_rate,
    positive_seconds,
    size_bytes,
    target_port,
    unix_socket_path,
)
from .._net import check_host, check_unix_path
from ..client import UDP_TIMEOUT_S
from ..config import DEFAULT_HOST, DEFAULT_PORT, LOOPS
from .patterns import DEFAULT_WINDOW_BYTES, PATTERNS, UDP_PATTERNS, Pattern

MAX_CONNECTIONS = 100_000
MAX_PROCESSES = 256
MAX_SIZE_BYTES = 1 << 30
MAX_DATAGRAM_BYTES = 65_507  # the most one UDP datagram carries over IPv4
PROXY_VERSIONS = ("v1", "v2")
DEFAULT_TIMEOUT_S = 10.0
# The options `echoplex client` shares (added by `echoplex.commands.client`).
STREAM_TRANSPORT = ("unix_path", "tls", "ca_file", "tls_insecure", "send_proxy")
TRANSPORT = "transport (as `echoplex client`; default TCP to --host:--port)"

# Typed Any: the field keeps its own type, and never holds these once built.
WINDOW_FOR_STREAM: Any = FromOtherSettings(
    f"{DEFAULT_WINDOW_BYTES}, and only for the stream pattern"
)
TIMEOUT_BY_TRANSPORT: Any = FromOtherSettings(
    f"{DEFAULT_TIMEOUT_S:g}, or {UDP_TIMEOUT_S:g} with udp"
)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as `taskset` sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def process_count(text: str) -> int:
    """`auto` (one per CPU this process may use) or 1 to MAX_PROCESSES."""
    if text.strip().lower() == "auto":
        return min(usable_cpus(), MAX_PROCESSES)
    try:
        return at_most(MAX_PROCESSES, positive_int)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (a number of processes, or auto)") from None


def message_size(text: str) -> int:
    """A message size: 1 byte to MAX_SIZE_BYTES, with K/KiB/M/MiB... (see `size_bytes`)."""
    return size_bytes(text, MAX_SIZE_BYTES)


@dataclass(frozen=True)
class LoadConfig:
    """Each field `echoplex load` sets declares its option beside it (`option()`): the
    command's options and the mapping back are generated from them; errors name the
    settings as `field_name`, which the command shows as flags."""

    host: str = option(
        DEFAULT_HOST, "--host", "server address (default {default})", parse=host_name
    )
    """Server to load; a name is resolved once, before the first connect."""

    port: int = option(DEFAULT_PORT, "--port", "server port (default {default})", parse=target_port)
    """Server port, 1..65535."""

    pattern: str = option(
        "pingpong",
        "--pattern",
        "traffic pattern (default {default}). "
        + described({name: pattern.description for name, pattern in PATTERNS.items()}),
        choices=tuple(PATTERNS),
    )
    """A key of `PATTERNS` (`echoplex.load.patterns`); the class is `pattern_class`."""

    connections: int = option(
        10,
        "--connections",
        "connections to open (default {default})",
        parse=positive_int,
        short="-c",
    )
    """Connections opened (and, for `rate`, sharing the rate)."""

    size_bytes: int = option(
        1024,
        "--size",
        "bytes per message; K/KiB/M/MiB are powers of 1024, KB/MB of 1000 (default {default})",
        parse=message_size,
        metavar="BYTES",
        short="-s",
    )
    """Bytes in one message: a ping-pong, a scheduled send, a stream chunk, a hold check."""

    duration_s: float = option(
        10.0,
        "--duration",
        "measured time; for hold, how long connections stay idle (default {default})",
        parse=positive_seconds,
        metavar="DURATION",
        short="-d",
    )
    """Measured time after the warmup; for `hold`, how long connections stay idle."""

    warmup_s: float = option(
        0.0,
        "--warmup",
        "traffic before the measured time, left out of every figure (default {default})",
        parse=non_negative_seconds,
        metavar="DURATION",
    )
    """Traffic before the measured time, left out of every figure (not used by `hold`)."""

    rate_per_s: float | None = option(
        None,
        "--rate",
        "with --pattern rate (required there): messages per second, all connections together",
        parse=positive_rate,
        metavar="PER_S",
    )
    """`rate` only: messages per second in all, spread evenly over the connections."""

    window_bytes: int = option(
        WINDOW_FOR_STREAM,
        "--window",
        "with --pattern stream: bytes in flight per connection "
        f"(default {binary_size(DEFAULT_WINDOW_BYTES)})",
        parse=message_size,
        metavar="BYTES",
    )
    """`stream` only: bytes in flight per connection (at least one message). Default:
    256 KiB; given with another pattern, an error."""

    connect_rate_per_s: float | None = option(
        None,
        "--connect-rate",
        "new connections per second while opening (default: as fast as they open)",
        parse=positive_rate,
        metavar="PER_S",
    )
    """New connections per second while opening; None opens them as fast as they come up."""

    timeout_s: float = option(
        TIMEOUT_BY_TRANSPORT,
        "--timeout",
        "a connect, or an echo making no progress, fails after this long; also how long the "
        f"end waits for echoes in flight (default {DEFAULT_TIMEOUT_S:g}); with --udp, a "
        f"datagram not echoed this long after it was sent is lost (default {UDP_TIMEOUT_S:g})",
        parse=positive_seconds,
        metavar="DURATION",
    )
    """A connect, or an echo that makes no progress, fails after this long; also how long
    the end of a run waits for echoes still in flight. With `udp`, a datagram whose echo
    has not come back this long after it was sent counts as lost. Default: 10 seconds,
    with `udp` 2 (as `echoplex client --udp`)."""

    seed: int = option(0, "--seed", "seed of the payload bytes (default {default})", parse=int)
    """Seed of the payload bytes."""

    loop: str = option(
        "auto",
        "--loop",
        "event loop (default {default}: uvloop if installed)",
        choices=LOOPS,
    )
    """Event loop: auto (uvloop if installed), asyncio, uvloop."""

    unix_path: str | None = option(
        None,
        "--unix",
        "connect to a Unix domain socket instead",
        parse=unix_socket_path,
        metavar="PATH",
        group=TRANSPORT,
    )
    """Connect to this Unix domain socket instead of host:port."""

    tls: bool = option(
        False, "--tls", "speak TLS (1.2 or newer), verifying --host", group=TRANSPORT
    )
    """Speak TLS over each connection, verifying the server as `host`."""

    ca_file: str | None = option(
        None,
        "--ca",
        "verify the server against this CA file (with --tls)",
        parse=file_path,
        metavar="FILE",
        group=TRANSPORT,
    )
    """With `tls`: verify the server against this CA file (default: the system's CAs)."""

    tls_insecure: bool = option(
        False, "--insecure", "with --tls, verify nothing (testing only)", group=TRANSPORT
    )
    """With `tls`: verify nothing (testing only)."""

    send_proxy: str | None = option(
        None,
        "--send-proxy",
        "start each connection with a PROXY protocol header naming it (before TLS), as "
        "HAProxy's send-proxy does, to test a server behind one",
        choices=PROXY_VERSIONS,
        group=TRANSPORT,
    )
    """`v1` or `v2`: each connection starts with a PROXY protocol header naming itself,
    sent before TLS, as HAProxy's send-proxy does."""

    processes: int = option(
        1,
        "--processes",
        "spread the connections over N processes, each with its own event loop (auto: "
        "one per CPU this one may use); their counts and latency histograms are merged "
        "exactly, and connections keep one numbering. At most one per connection "
        "(default {default})",
        parse=process_count,
        metavar="N",
    )
    """Processes the connections are spread over (`echoplex.load.processes`); a run with
    fewer connections uses one process per connection."""

    first_connection: int = 0
    """Number of this run's first connection, which names its payload and its errors: a
    share of a run spread over processes starts where the previous share ends."""

    udp: bool = option(
        False,
        "--udp",
        "UDP echo: each connection a UDP socket, each message one datagram of at most "
        f"{MAX_DATAGRAM_BYTES:,} bytes, verified; pingpong and rate only. A datagram not "
        "echoed within --timeout is lost, an error. Start the server with --udp-rate 0 "
        "--udp-rate-total 0 (or limits above the load), or its reflection guard drops most",
        group=TRANSPORT,
    )
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

    @property
    def pattern_class(self) -> type[Pattern]:
        """The pattern `pattern` names (`echoplex.load.patterns`)."""
        return PATTERNS[self.pattern]

    def __post_init__(self) -> None:
        if self.window_bytes is WINDOW_FOR_STREAM:
            object.__setattr__(self, "window_bytes", DEFAULT_WINDOW_BYTES)
        if self.timeout_s is TIMEOUT_BY_TRANSPORT:
            object.__setattr__(self, "timeout_s", UDP_TIMEOUT_S if self.udp else DEFAULT_TIMEOUT_S)
        problems = self._pattern_problems()
        if not 1 <= self.port <= 65535:
            problems.append(f"`port` must be 1..65535, not {self.port}")
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            problems.append(f"`connections` must be 1..{MAX_CONNECTIONS}, not {self.connections}")
        if not 1 <= self.processes <= MAX_PROCESSES:
            problems.append(f"`processes` must be 1..{MAX_PROCESSES}, not {self.processes}")
        if not 0 <= self.first_connection <= MAX_CONNECTIONS:
            problems.append(
                f"`first_connection` must be 0..{MAX_CONNECTIONS}, not {self.first_connection}"
            )
        if not 1 <= self.size_bytes <= MAX_SIZE_BYTES:
            problems.append(
                f"`size_bytes` must be 1..{MAX_SIZE_BYTES} bytes, not {self.size_bytes}"
            )
        if not 0 < self.duration_s < float("inf"):
            problems.append(f"`duration_s` must be more than 0 seconds, not {self.duration_s}")
        if not 0 <= self.warmup_s < float("inf"):
            problems.append(f"`warmup_s` must be 0 seconds or more, not {self.warmup_s}")
        if not 0 < self.timeout_s < float("inf"):
            problems.append(f"`timeout_s` must be more than 0 seconds, not {self.timeout_s}")
        if self.connect_rate_per_s is not None and not 0 < self.connect_rate_per_s < float("inf"):
            problems.append(
                "`connect_rate_per_s` must be more than 0 connections/s, "
                f"not {self.connect_rate_per_s}"
            )
        if self.loop not in LOOPS:
            problems.append(f"`loop` must be one of {', '.join(LOOPS)}, not {self.loop!r}")
        problems += self._transport_problems()
        if problems:
            raise ValueError(problems[0])

    def _pattern_problems(self) -> list[str]:
        pattern = PATTERNS.get(self.pattern)
        if pattern is None:
            choices = ", ".join(PATTERNS)
            return [f"unknown `pattern` {self.pattern!r} (choose from {choices})"]
        problems = []
        for other in PATTERNS.values():
            for setting, unused in other.own_settings.items():
                # The unused value passes: `dataclasses.replace` hands a resolved one back.
                if other is not pattern and getattr(self, setting) != unused:
                    problems.append(f"`{setting}` applies only to `pattern` {other.name}")
        return problems + pattern.problems(self)

    def _transport_problems(self) -> list[str]:
        problems = []
        if (self.ca_file or self.tls_insecure) and not self.tls:
            problems.append("`ca_file` and `tls_insecure` go with `tls`")
        if self.send_proxy is not None and self.send_proxy not in PROXY_VERSIONS:
            problems.append(f"`send_proxy` must be v1 or v2, not {self.send_proxy!r}")
        for check, value in ((check_host, self.host), (check_unix_path, self.unix_path)):
            try:
                if value is not None:
                    check(value)
            except ValueError as exc:
                problems.append(str(exc))
        if not self.udp:
            return problems
        if self.tls or self.unix_path is not None or self.send_proxy is not None:
            problems.append("`udp` does not go with `tls`, `unix_path` or `send_proxy`")
        pattern = PATTERNS.get(self.pattern)
        if pattern is not None and pattern.datagram_connection is None:
            problems.append(
                f"`pattern` {self.pattern} does not go with `udp`: {pattern.not_over_udp} "
                f"(use {' or '.join(UDP_PATTERNS)})"
            )
        if self.size_bytes > MAX_DATAGRAM_BYTES:
            problems.append(
                f"with `udp`, size must be 1..{MAX_DATAGRAM_BYTES} bytes (one datagram), "
                f"not {self.size_bytes}"
            )
        return problems
