"""The one configuration object behind `echoplex serve`, the tutorial script and the API.

Every concurrency model reads the same frozen `ServerConfig`; the CLI only builds one.
Units are part of the field names (`_s` for seconds, `_bytes` for sizes).

Each field that `echoplex serve` can set declares its option beside it, once, with
`option()` (flag, help, help section, argument type; the `ECHOPLEX_*` variable is the
flag's name): the command's options, their environment variables and the mapping back
onto this class are generated from these declarations (`echoplex._cli_util`). Errors
name the settings as `field_name`; the command shows them as the flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ._cli_util import (
    FromOtherSettings,
    at_most,
    byte_size,
    check_declared,
    datagram_rate,
    described,
    file_path,
    host_name,
    non_negative_int,
    non_negative_seconds,
    octal_mode,
    option,
    port_number,
    positive_int,
    positive_seconds,
    unix_socket_path,
)
from ._net import check_host, check_unix_path, is_loopback
from .conditions import ConditionError, Conditions, Work, reader
from .models import MODELS
from .proxy_protocol import Network, parse_networks

DEFAULT_PORT = 12345
# The kernel caps this at net.core.somaxconn; asking for more costs nothing and
# lets bursts of thousands of connects queue instead of being refused.
DEFAULT_BACKLOG = 4096
MAX_BACKLOG = 2**31 - 1  # listen() takes a C int
LOOPS = ("auto", "asyncio", "uvloop")
# More processes than this is a fork bomb, not a server (a mistyped --workers 1000000).
MAX_WORKERS = 1024
# The pool starts every thread at once; each takes a stack and a slot in the scheduler.
MAX_THREADS = 4096
MAX_BUFFER_BYTES = 1 << 30
DEFAULT_HOST = "127.0.0.1"


# Typed Any: the field keeps its own type, and never holds these once built.
HOSTS_UNLESS_UNIX: Any = FromOtherSettings(f"({DEFAULT_HOST!r},), or () with unix_path")
TCP_UNLESS_UDP_ALONE: Any = FromOtherSettings("True, or False when only udp is asked for")

TLS = "TLS"
PROXY = "PROXY protocol (behind HAProxy and the like)"
METRICS = "metrics"
LIMITS = "limits (0 turns a limit off)"
CONDITIONS = "conditions on purpose: a slow, broken or busy endpoint, to test clients"
CONTROL = "control API (change the conditions while serving)"
UDP = "UDP echo (RFC 862), rate-limited against reflection"


@dataclass(frozen=True)
class ServerConfig:
    mode: str = option(
        "threads",
        "--mode",
        "concurrency model (default {default}). "
        + described({name: entry.description for name, entry in MODELS.items()}),
        choices=tuple(MODELS),
    )
    """Concurrency model, a key of `echoplex.models.MODELS`."""

    hosts: tuple[str, ...] = option(
        HOSTS_UNLESS_UNIX,
        "--host",
        f"address to listen on, repeatable; `::` serves IPv6 and IPv4 (default {DEFAULT_HOST}, "
        "or none when --unix is given)",
        parse=host_name,
        metavar="HOST",
    )
    """Addresses to listen on, each on `port`. An IPv6 literal (with ':') listens on IPv6;
    `::` alone also takes IPv4 clients (dual stack). Empty: no TCP listener of our own
    (only `unix_path` or sockets passed by systemd). Default: 127.0.0.1, none when
    `unix_path` is given."""

    port: int = option(
        DEFAULT_PORT,
        "--port",
        "port to listen on, 0 for any free one (default {default})",
        parse=port_number,
    )
    """TCP port; 0 picks a free one (the first host's; the others bind the same number)."""

    unix_path: str | None = option(
        None,
        "--unix",
        "also listen on this Unix domain socket path",
        parse=unix_socket_path,
        metavar="PATH",
    )
    """Also listen on this Unix domain socket path."""

    unix_mode: int = option(
        0o600,
        "--unix-mode",
        "permissions of the --unix socket file, in octal (default {default})",
        parse=octal_mode,
        metavar="MODE",
    )
    """Permissions of the Unix socket file: who may connect."""

    tls_cert_file: str | None = option(
        None, "--tls-cert", "PEM certificate chain", parse=file_path, metavar="FILE", group=TLS
    )
    """PEM certificate chain: with `tls_key_file`, every TCP connection speaks TLS 1.2+."""

    tls_key_file: str | None = option(
        None, "--tls-key", "PEM private key", parse=file_path, metavar="FILE", group=TLS
    )
    """PEM private key of `tls_cert_file`."""

    tls_handshake_timeout_s: float = option(
        10.0,
        "--tls-handshake-timeout",
        "drop a client that has not finished its handshake by then (default {default})",
        parse=positive_seconds,
        metavar="DURATION",
        group=TLS,
    )
    """Drop a client that has not completed the TLS handshake in this long."""

    tls_client_ca_file: str | None = option(
        None,
        "--tls-client-ca",
        "require a client certificate signed by this CA (PEM): mutual TLS",
        parse=file_path,
        metavar="FILE",
        group=TLS,
    )
    """PEM CA bundle: with it, a client must present a certificate it signed (mutual TLS)."""

    metrics_port: int | None = option(
        None,
        "--metrics-port",
        "serve Prometheus metrics on /metrics and health on /healthz (needs echoplex[metrics])",
        parse=port_number,
        metavar="PORT",
        group=METRICS,
    )
    """Serve Prometheus metrics (`/metrics`) and health (`/healthz`) over HTTP on this port
    (0: any free one); None: no metrics."""

    metrics_host: str = option(
        DEFAULT_HOST,
        "--metrics-host",
        "address of the metrics endpoint (default {default})",
        parse=host_name,
        metavar="HOST",
        group=METRICS,
    )
    """Address of the metrics endpoint."""

    proxy_protocol: bool = option(
        False,
        "--proxy-protocol",
        "require a PROXY v1/v2 header from --trusted-proxy peers; logs and limits then see "
        "the real client",
        group=PROXY,
    )
    """Expect a PROXY protocol (v1 or v2) header from `trusted_proxies`, and require it:
    logs, limits and metrics then see the real client. Other peers are plain clients."""

    trusted_proxies: tuple[str, ...] = option(
        (),
        "--trusted-proxy",
        "a network whose connections carry the header (repeatable; commas allowed)",
        metavar="CIDR",
        group=PROXY,
    )
    """Networks (CIDR) whose connections carry a PROXY header, e.g. `10.0.0.0/8`, `::1`;
    an item may be a comma-separated list."""

    proxy_header_timeout_s: float = option(
        5.0,
        "--proxy-header-timeout",
        "drop a proxied connection with no complete header by then (default {default})",
        parse=positive_seconds,
        metavar="DURATION",
        group=PROXY,
    )
    """Drop a trusted proxy's connection with no complete header this long after accept
    (the PROXY protocol specification asks for at least 3 seconds)."""

    backlog: int = option(
        DEFAULT_BACKLOG,
        "--backlog",
        "listen backlog (default {default})",
        parse=at_most(MAX_BACKLOG, positive_int),
    )
    """listen() backlog: connections the kernel queues before we accept them."""

    threads: int = option(
        32,
        "--threads",
        "worker threads of the pool model (default {default})",
        parse=at_most(MAX_THREADS, positive_int),
    )
    """Worker threads of the `pool` model."""

    workers: int = option(
        0,
        "--workers",
        "processes of the workers model (default {default}: one per CPU)",
        parse=at_most(MAX_WORKERS, non_negative_int),
    )
    """Processes of the `workers` model; 0 means one per CPU."""

    loop: str = option(
        "auto",
        "--loop",
        "event loop of asyncio/workers (default {default}: uvloop if installed)",
        choices=LOOPS,
    )
    """Event loop of `asyncio` and `workers`: auto (uvloop if installed), asyncio, uvloop."""

    drain_timeout_s: float = option(
        5.0,
        "--drain-timeout",
        "on SIGTERM/SIGINT, how long open connections may finish (default {default})",
        parse=non_negative_seconds,
        metavar="DURATION",
    )
    """On SIGTERM/SIGINT, how long open connections may go on before they are closed."""

    log_data: bool = option(
        False, "--log-data", "log every chunk received, as the tutorial prints it"
    )
    """Report every chunk received (the tutorial's `Received: b'...'` lines)."""

    recv_bytes: int = 65536
    """Largest read from a connection at once."""

    max_connections: int = option(
        20_000,
        "--max-connections",
        "connections served at once; more are accepted and closed at once (default {default})",
        parse=non_negative_int,
        metavar="N",
        group=LIMITS,
    )
    """Connections served at once; past it a new one is accepted and closed at once. 0: no
    limit. Bounded by default: a thread (or buffer) per connection is memory a flood takes."""

    max_per_ip: int = option(
        0,
        "--max-per-ip",
        "connections at once from one client address (default {default}: no limit)",
        parse=non_negative_int,
        metavar="N",
        group=LIMITS,
    )
    """Connections served at once from one client address; 0: no limit."""

    idle_timeout_s: float = option(
        300.0,
        "--idle-timeout",
        "close a connection silent both ways this long (default {default})",
        parse=non_negative_seconds,
        metavar="DURATION",
        group=LIMITS,
    )
    """Close a connection with no byte in either direction for this long; 0: never."""

    max_lifetime_s: float = option(
        0.0,
        "--max-lifetime",
        "close a connection this old, however busy (default {default}: never)",
        parse=non_negative_seconds,
        metavar="DURATION",
        group=LIMITS,
    )
    """Close a connection this old, however busy (bounds a client trickling bytes); 0: never."""

    # Not among the limits that 0 turns off: it is the backpressure bound itself, and
    # without it a client that sends and never reads would grow server memory forever.
    max_buffer_bytes: int = option(
        65536,
        "--max-buffer",
        "echo bytes held per connection before it stops being read: the backpressure "
        "bound, 1 byte or more, never off (default {default})",
        parse=byte_size(MAX_BUFFER_BYTES),
        metavar="BYTES",
    )
    """Echo bytes held per connection at most: past it, the server stops reading that client
    until its echo is written, so a client that never reads cannot grow server memory."""

    zero_copy: bool = option(
        True,
        "--zero-copy",
        "echo streaming clients with splice(2), bytes never entering Python (Linux; threads "
        "and simple models; not with TLS or --log-data; default on)",
        negatable=True,
    )
    """Echo a streaming client with splice(2) through a pipe (Linux, blocking models), so
    its bytes never enter Python; off under TLS and `log_data`, where Python must see them."""

    send_timeout_s: float = option(
        30.0,
        "--send-timeout",
        "close a connection that takes none of its echo this long (default {default})",
        parse=non_negative_seconds,
        metavar="DURATION",
        group=LIMITS,
    )
    """Close a connection that accepts no byte of its echo for this long; 0: never."""

    latency_s: float = option(
        0.0,
        "--latency",
        "echo each chunk this long after it arrived; reading goes on meanwhile (a delay line)",
        parse=reader("latency"),
        metavar="DURATION",
        group=CONDITIONS,
    )
    """Echo each chunk this long after it arrived, in order (TCP and UDP)."""

    jitter_s: float = option(
        0.0,
        "--jitter",
        "add a uniform random -D..+D to each --latency",
        parse=reader("jitter"),
        metavar="DURATION",
        group=CONDITIONS,
    )
    """A uniform random -D..+D on each latency (never below 0)."""

    bandwidth_bytes_per_s: int | None = option(
        None,
        "--bandwidth",
        "echo at most RATE bytes a second per connection (64KiB, 1MB)",
        parse=reader("bandwidth"),
        metavar="RATE",
        group=CONDITIONS,
    )
    """The most bytes of echo a second per connection; None: no cap."""

    slice_bytes: int | None = option(
        None,
        "--slice",
        "write the echo in pieces of at most BYTES",
        parse=reader("slice"),
        metavar="BYTES",
        group=CONDITIONS,
    )
    """Write the echo in pieces of at most this many bytes; None: as it comes."""

    slice_delay_s: float = option(
        0.0,
        "--slice-delay",
        "time between two --slice pieces",
        parse=reader("slice_delay"),
        metavar="DURATION",
        group=CONDITIONS,
    )
    """The time between two slices."""

    close_after_bytes: int | None = option(
        None,
        "--close-after",
        "close cleanly (FIN, never RST) after BYTES of echo",
        parse=reader("close_after"),
        metavar="BYTES",
        group=CONDITIONS,
    )
    """Close cleanly after exactly this many bytes of echo; None: never."""

    reset_after_bytes: int | None = option(
        None,
        "--reset-after",
        "reset the connection (RST) after BYTES of echo",
        parse=reader("reset_after"),
        metavar="BYTES",
        group=CONDITIONS,
    )
    """Reset the connection after exactly this many bytes of echo; None: never."""

    stall_after_bytes: int | None = option(
        None,
        "--stall-after",
        "after BYTES of echo, stop echoing and reading, as a hung peer does",
        parse=reader("stall_after"),
        metavar="BYTES",
        group=CONDITIONS,
    )
    """Stall (no echo, no reading) after this many bytes of echo; None: never."""

    stall_for_s: float | None = option(
        None,
        "--stall-for",
        "how long a --stall-after stall lasts (default: until a limit such as "
        "--idle-timeout ends the connection)",
        parse=reader("stall_for"),
        metavar="DURATION",
        group=CONDITIONS,
    )
    """How long a stall lasts; None: until a limit ends the connection."""

    slow_close_s: float = option(
        0.0,
        "--slow-close",
        "after the client half-closes and has every byte back, wait this long to close",
        parse=reader("slow_close"),
        metavar="DURATION",
        group=CONDITIONS,
    )
    """After the client's EOF and the last byte of echo, wait this long before closing."""

    toxicity: float = option(
        1.0,
        "--toxicity",
        "share of connections (0 to 1) that get the conditions, drawn per connection "
        "(default {default})",
        parse=reader("toxicity"),
        metavar="FRACTION",
        group=CONDITIONS,
    )
    """The share of connections (UDP: of datagrams) that get the conditions."""

    condition_seed: int | None = option(
        None,
        "--condition-seed",
        "seed of the --toxicity, --jitter and --drop draws, for a repeatable run",
        parse=reader("seed"),
        metavar="N",
        group=CONDITIONS,
    )
    """Seed of the conditions' random draws; None: from the OS."""

    work: Work | None = option(  # noqa: RUF009  (a field(), as every option)
        None,
        "--work",
        "handler work before each chunk's echo: io:DURATION waits, cpu:DURATION computes; "
        "unlike the conditions, it holds the model's concurrency, as real work does",
        parse=reader("work"),
        show=str,
        metavar="KIND:DURATION",
        group=CONDITIONS,
    )
    """Work the handler does before each chunk's echo (`echoplex.conditions.Work`)."""

    drop: float = option(
        0.0,
        "--drop",
        "UDP: the share of datagrams (0 to 1) not answered",
        parse=reader("drop"),
        metavar="FRACTION",
        group=CONDITIONS,
    )
    """The share of UDP datagrams left unanswered."""

    control_port: int | None = option(
        None,
        "--control-port",
        "serve the conditions API (GET/PUT/DELETE /conditions) on this port",
        parse=port_number,
        metavar="PORT",
        group=CONTROL,
    )
    """Serve the control API on this port (0: any free one); None: no control API."""

    control_host: str = option(
        DEFAULT_HOST,
        "--control-host",
        "address of the control API (default {default}; off loopback it needs --control-token)",
        parse=host_name,
        metavar="HOST",
        group=CONTROL,
    )
    """Address of the control API: loopback, unless `control_token` is set."""

    control_token: str | None = option(
        None,
        "--control-token",
        "bearer token the control API requires (better given as ECHOPLEX_CONTROL_TOKEN)",
        metavar="TOKEN",
        group=CONTROL,
    )
    """The token a control request must carry (`Authorization: Bearer TOKEN`); None: none
    is asked for, and the API then listens on loopback only."""

    tcp: bool = option(
        TCP_UNLESS_UDP_ALONE,
        "--tcp",
        "serve TCP (the default unless --udp is given)",
        group=UDP,
    )
    """Serve TCP, through `mode`. Default: yes, unless `udp` alone is asked for."""

    udp: bool = option(
        False,
        "--udp",
        "serve UDP echo; alone, UDP only (with --tcp, both on the same port)",
        group=UDP,
    )
    """Serve UDP echo (RFC 862) on `hosts` and the same port number (`echoplex.udp`)."""

    udp_rate_per_source: float = option(
        100.0,
        "--udp-rate",
        "datagrams answered per second per source address, bursts of twice that "
        "(default {default}; 0: no limit)",
        parse=datagram_rate,
        metavar="PER_S",
        group=UDP,
    )
    """UDP datagrams answered per second per source address (IPv6: per /64), in bursts of
    up to twice that; 0: no limit. Interactive use and health checks send a few a second;
    a spoofed flood can reflect no more than this at one victim."""

    udp_rate_total: float = option(
        10_000.0,
        "--udp-rate-total",
        "datagrams answered per second from all sources, bursts of twice that "
        "(default {default}; 0: no limit)",
        parse=datagram_rate,
        metavar="PER_S",
        group=UDP,
    )
    """UDP datagrams answered per second from all sources together, bursts of twice that;
    0: no limit. Caps what the server reflects however many addresses a flood forges, a
    fraction of what one event loop can echo, so TCP beside it keeps its share."""

    udp_max_sources: int = option(
        65_536,
        "--udp-max-sources",
        "source addresses whose rate is tracked at once (default {default})",
        parse=positive_int,
        metavar="N",
        group=UDP,
    )
    """Source addresses whose UDP rate is tracked at once: bounded memory, however many
    addresses a flood forges (a source's bucket is forgotten once it has refilled)."""

    conditions: Conditions = field(init=False, repr=False, compare=False)
    """The conditions and the work above, resolved and checked as one set."""

    trusted_networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)
    """`trusted_proxies` parsed, once, as the config is made: `echoplex.plan` hands them
    on (they are checked by being parsed, so they are parsed where they are checked)."""

    def __post_init__(self) -> None:
        if self.hosts is HOSTS_UNLESS_UNIX:
            hosts = () if self.unix_path is not None else (DEFAULT_HOST,)
            object.__setattr__(self, "hosts", hosts)
        if self.tcp is TCP_UNLESS_UDP_ALONE:
            object.__setattr__(self, "tcp", not self.udp)
        check_declared(self)  # each option's choices and range, as `echoplex serve` checks them
        for host in (*self.hosts, self.metrics_host):
            check_host(host)  # a ValueError naming it, not a UnicodeError at bind
        if self.unix_path is not None:
            check_unix_path(self.unix_path)
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError(
                "`proxy_protocol` needs `trusted_proxies` (the networks of the proxies that "
                "send the header)"
            )
        # A ValueError naming the bad entry.
        object.__setattr__(self, "trusted_networks", tuple(parse_networks(self.trusted_proxies)))
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                "TLS needs both a certificate and a key file (`tls_cert_file` and `tls_key_file`)"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("`tls_client_ca_file` needs TLS (`tls_cert_file` and `tls_key_file`)")
        object.__setattr__(self, "conditions", self._resolve_conditions())
        if self.control_token == "":
            raise ValueError("`control_token` must not be empty")
        if self.control_token is None and not is_loopback(self.control_host):
            raise ValueError(
                f"`control_host` {self.control_host!r} is not loopback: the control API "
                "changes how the server answers, so off loopback it needs `control_token`"
            )
        if self.recv_bytes < 1:
            raise ValueError(f"`recv_bytes` must be at least 1, not {self.recv_bytes}")
        if not (self.tcp or self.udp):
            raise ValueError("serve TCP, UDP or both: `tcp` and `udp` are both off")
        try:
            self.conditions.check_served(tcp=self.tcp, udp=self.udp)
        except ConditionError as exc:
            raise ValueError(str(exc)) from None
        if self.udp and not self.hosts:
            raise ValueError("`udp` needs a host to listen on (`hosts`)")

    def _resolve_conditions(self) -> Conditions:
        try:
            return Conditions(
                latency_s=self.latency_s,
                jitter_s=self.jitter_s,
                bandwidth_bytes_per_s=self.bandwidth_bytes_per_s,
                slice_bytes=self.slice_bytes,
                slice_delay_s=self.slice_delay_s,
                close_after_bytes=self.close_after_bytes,
                reset_after_bytes=self.reset_after_bytes,
                stall_after_bytes=self.stall_after_bytes,
                stall_for_s=self.stall_for_s,
                slow_close_s=self.slow_close_s,
                toxicity=self.toxicity,
                seed=self.condition_seed,
                work=self.work,
                drop=self.drop,
            )
        except ConditionError as exc:
            raise ValueError(str(exc)) from None

    @property
    def worker_count(self) -> int:
        # The CPUs this process may run on (taskset, cpusets), not all the host has.
        return self.workers or len(os.sched_getaffinity(0)) or 1
