"""The one configuration object of a load run, built by `echoplex load` or by hand.

Units are part of the field names, as in `ServerConfig`. The transport fields
(`unix_path`, `tls`, `send_proxy`, `udp`) mirror `echoplex client`'s options; how each
transport connects is `echoplex.load.transport`.
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .._cli_util import (
    Bounded,
    FromOtherSettings,
    binary_size,
    byte_size,
    check_declared,
    described,
    file_path,
    host_name,
    non_negative_seconds,
    option,
    positive_int,
    positive_rate,
    positive_seconds,
    seconds_written,
    target_port,
    unix_socket_path,
)
from .._net import check_host, check_unix_path
from ..client import UDP_TIMEOUT_S
from ..config import DEFAULT_HOST, DEFAULT_PORT, LOOPS
from ..tls import checked_client_context
from .patterns import DEFAULT_WINDOW_BYTES, PATTERNS, UDP_PATTERNS, Pattern
from .sources import MAX_SOURCES, family_mismatch, source_addresses

MAX_CONNECTIONS = 100_000
MAX_PROCESSES = 256
MAX_SIZE_BYTES = 1 << 30
MAX_DATAGRAM_BYTES = 65_507  # the most one UDP datagram carries over IPv4
PROXY_VERSIONS = ("v1", "v2")
DEFAULT_TIMEOUT_S = 10.0
# The options `echoplex client` shares (added by `echoplex.commands.client`).
STREAM_TRANSPORT = (
    "unix_path",
    "tls",
    "ca_file",
    "tls_insecure",
    "cert_file",
    "key_file",
    "send_proxy",
)
TRANSPORT = "transport (as `echoplex client`; default TCP to --host:--port)"

# Typed Any: the field keeps its own type, and never holds these once built.
WINDOW_FOR_STREAM: Any = FromOtherSettings(
    f"{DEFAULT_WINDOW_BYTES}, and only for the stream pattern"
)
TIMEOUT_BY_TRANSPORT: Any = FromOtherSettings(
    f"{DEFAULT_TIMEOUT_S:g}, or {UDP_TIMEOUT_S:g} with udp"
)


class RegisteredNames(Sequence[str]):
    """The names in a registry as it is when asked, for an option's choices: a pattern
    registered after this module is imported is a choice too."""

    def __init__(self, registry: Mapping[str, object]) -> None:
        self.registry = registry

    def __getitem__(self, index: Any) -> Any:
        return list(self.registry)[index]

    def __len__(self) -> int:
        return len(self.registry)

    def __contains__(self, name: object) -> bool:
        return name in self.registry


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as `taskset` sets it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_PROCESSES_OR_AUTO = "(a number of processes, or auto)"


def _processes_or_auto(text: str) -> int:
    if text.strip().lower() == "auto":
        return min(usable_cpus(), MAX_PROCESSES)
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a whole number: {text!r} {_PROCESSES_OR_AUTO}"
        ) from None


process_count = Bounded(
    _processes_or_auto,
    1,
    MAX_PROCESSES,
    f"must be at least {{least}}, not {{value}} {_PROCESSES_OR_AUTO}",
    f"must be at most {{most}}, not {{value}} {_PROCESSES_OR_AUTO}",
)
"""`auto` (one per CPU this process may use) or 1 to MAX_PROCESSES."""

message_size = byte_size(MAX_SIZE_BYTES)
"""A message size: 1 byte to MAX_SIZE_BYTES, with K/KiB/M/MiB... (see `byte_size`)."""


def source_range(text: str) -> str:
    """`--source`: an address or a range of them (`echoplex.load.sources`)."""
    try:
        source_addresses(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


connection_count = Bounded(
    positive_int.read, 1, MAX_CONNECTIONS, too_high="connections must be 1..{most}, not {value}"
)


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
        choices=RegisteredNames(PATTERNS),
    )
    """A key of `PATTERNS` (`echoplex.load.patterns`); the class is `pattern_class`."""

    connections: int = option(
        10,
        "--connections",
        "connections to open (default {default})",
        parse=connection_count,
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
        "with --pattern rate (required there): messages per second, all connections "
        "together, spread evenly: each connection sends once every connections/rate "
        "seconds (with -c 100000 --rate 10000, once every 10 s), in turn",
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

    source: str | None = option(
        None,
        "--source",
        "bind each connection to one of these source addresses before it connects, in "
        "turn by connection number (over every --processes too, so each address gets an "
        "even share): one address, or a range such as 127.0.0.1-127.0.0.8 (at most "
        f"{MAX_SOURCES}). Each source has its own ephemeral ports (about 28,000 by "
        "default), so one server port takes that many connections per source; TCP, TLS "
        "and UDP (default: the system picks)",
        parse=source_range,
        metavar="ADDR[-ADDR]",
    )
    """Source addresses, `ADDR` or `FIRST-LAST` (`sources`): connection n binds to the
    n-th mod their number. None: the system picks one."""

    timeout_s: float = option(
        TIMEOUT_BY_TRANSPORT,
        "--timeout",
        "a connect, or an echo making no progress, fails after this long; also how long the "
        f"end waits for echoes in flight (default {seconds_written(DEFAULT_TIMEOUT_S)}); with "
        "--udp, a datagram not echoed this long after it was sent is lost (default "
        f"{seconds_written(UDP_TIMEOUT_S)})",
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

    cert_file: str | None = option(
        None,
        "--cert",
        "with --tls, present this client certificate (PEM; its key in it too, or --key), "
        "for a server that requires one (mutual TLS)",
        parse=file_path,
        metavar="FILE",
        group=TRANSPORT,
    )
    """With `tls`: the client certificate (PEM chain) to present, for mutual TLS."""

    key_file: str | None = option(
        None,
        "--key",
        "the private key of --cert (PEM; default: in the --cert file)",
        parse=file_path,
        metavar="FILE",
        group=TRANSPORT,
    )
    """The private key of `cert_file` (default: in `cert_file` itself)."""

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

    @cached_property
    def sources(self) -> tuple[str, ...]:
        """The addresses `source` names (none without it)."""
        return source_addresses(self.source) if self.source is not None else ()

    @property
    def pattern_class(self) -> type[Pattern]:
        """The pattern `pattern` names (`echoplex.load.patterns`)."""
        return PATTERNS[self.pattern]

    @cached_property
    def tls_context(self) -> ssl.SSLContext | None:
        """The client TLS context of a `tls` run, built once per process from `ca_file`,
        `tls_insecure`, `cert_file` and `key_file` (None without `tls`): the command
        builds it to refuse a bad file as a bad argument, and the run uses that one. A
        ValueError naming a file that cannot be used."""
        if not self.tls:
            return None
        return checked_client_context(
            self.ca_file,
            insecure=self.tls_insecure,
            cert_file=self.cert_file,
            key_file=self.key_file,
        )

    def __getstate__(self) -> dict[str, Any]:
        # An SSLContext cannot be pickled: a share in another process builds its own.
        return {name: value for name, value in vars(self).items() if name != "tls_context"}

    def __post_init__(self) -> None:
        if self.window_bytes is WINDOW_FOR_STREAM:
            object.__setattr__(self, "window_bytes", DEFAULT_WINDOW_BYTES)
        if self.timeout_s is TIMEOUT_BY_TRANSPORT:
            object.__setattr__(self, "timeout_s", UDP_TIMEOUT_S if self.udp else DEFAULT_TIMEOUT_S)
        check_declared(self)  # each option's range and choices, as its parser checks them
        problems = self._pattern_problems()
        if not 0 <= self.first_connection <= MAX_CONNECTIONS:
            problems.append(
                f"`first_connection` must be 0..{MAX_CONNECTIONS}, not {self.first_connection}"
            )
        problems += self._transport_problems()
        if problems:
            raise ValueError(problems[0])

    def _pattern_problems(self) -> list[str]:
        pattern = PATTERNS[self.pattern]  # a registered one: `check_declared` saw to it
        problems = []
        for other in PATTERNS.values():
            for setting, unused in other.own_settings.items():
                # The unused value passes: `dataclasses.replace` hands a resolved one back.
                if other is not pattern and getattr(self, setting) != unused:
                    problems.append(f"`{setting}` applies only to `pattern` {other.name}")
        return problems + pattern.problems(self)

    def _source_problems(self) -> list[str]:
        if self.source is None:
            return []
        if self.unix_path is not None:
            return ["`source` does not go with `unix_path` (a Unix socket has no address)"]
        try:
            mismatch = family_mismatch(self.sources, self.host)
        except ValueError as exc:
            return [f"`source`: {exc}"]
        return [f"`source` does not go with `host`: {mismatch}"] if mismatch else []

    def _transport_problems(self) -> list[str]:
        problems = []
        if (self.ca_file or self.tls_insecure) and not self.tls:
            problems.append("`ca_file` and `tls_insecure` go with `tls`")
        if (self.cert_file or self.key_file) and not self.tls:
            problems.append("`cert_file` and `key_file` go with `tls`")
        if self.key_file is not None and self.cert_file is None:
            problems.append("`key_file` goes with `cert_file`")
        for check, value in ((check_host, self.host), (check_unix_path, self.unix_path)):
            try:
                if value is not None:
                    check(value)
            except ValueError as exc:
                problems.append(str(exc))
        problems += self._source_problems()
        if not self.udp:
            return problems
        if self.tls or self.unix_path is not None or self.send_proxy is not None:
            problems.append("`udp` does not go with `tls`, `unix_path` or `send_proxy`")
        if self.pattern_class.datagram_connection is None:
            problems.append(
                f"`pattern` {self.pattern} does not go with `udp`: "
                f"{self.pattern_class.not_over_udp} "
                f"(use {' or '.join(UDP_PATTERNS)})"
            )
        if self.size_bytes > MAX_DATAGRAM_BYTES:
            problems.append(
                f"with `udp`, size must be 1..{MAX_DATAGRAM_BYTES} bytes (one datagram), "
                f"not {self.size_bytes}"
            )
        return problems
