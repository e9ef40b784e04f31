"""The one configuration object behind `echoplex serve`, the tutorial script and the API.

Every concurrency model reads the same frozen `ServerConfig`; the CLI only builds one.
Units are part of the field names (`_s` for seconds, `_bytes` for sizes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ServerConfig:
    mode: str = "threads"
    """Concurrency model, a key of `echoplex.models.MODELS`."""

    hosts: tuple[str, ...] = ("127.0.0.1",)
    """Addresses to listen on, each on `port`. An IPv6 literal (with ':') listens on IPv6;
    `::` alone also takes IPv4 clients (dual stack). Empty: no TCP listener of our own
    (only `unix_path` or sockets passed by systemd)."""

    port: int = DEFAULT_PORT
    """TCP port; 0 picks a free one (the first host's; the others bind the same number)."""

    unix_path: str | None = None
    """Also listen on this Unix domain socket path."""

    unix_mode: int = 0o600
    """Permissions of the Unix socket file: who may connect."""

    tls_cert_file: str | None = None
    """PEM certificate chain: with `tls_key_file`, every TCP connection speaks TLS 1.2+."""

    tls_key_file: str | None = None
    """PEM private key of `tls_cert_file`."""

    tls_handshake_timeout_s: float = 10.0
    """Drop a client that has not completed the TLS handshake in this long."""

    metrics_port: int | None = None
    """Serve Prometheus metrics (`/metrics`) and health (`/healthz`) over HTTP on this port
    (0: any free one); None: no metrics."""

    metrics_host: str = "127.0.0.1"
    """Address of the metrics endpoint."""

    proxy_protocol: bool = False
    """Expect a PROXY protocol (v1 or v2) header from `trusted_proxies`, and require it:
    logs, limits and metrics then see the real client. Other peers are plain clients."""

    trusted_proxies: tuple[str, ...] = ()
    """Networks (CIDR) whose connections carry a PROXY header, e.g. `10.0.0.0/8`, `::1`."""

    proxy_header_timeout_s: float = 5.0
    """Drop a trusted proxy's connection with no complete header this long after accept
    (the PROXY protocol specification asks for at least 3 seconds)."""

    backlog: int = DEFAULT_BACKLOG
    """listen() backlog: connections the kernel queues before we accept them."""

    threads: int = 32
    """Worker threads of the `pool` model."""

    workers: int = 0
    """Processes of the `workers` model; 0 means one per CPU."""

    loop: str = "auto"
    """Event loop of `asyncio` and `workers`: auto (uvloop if installed), asyncio, uvloop."""

    drain_timeout_s: float = 5.0
    """On SIGTERM/SIGINT, how long open connections may go on before they are closed."""

    log_data: bool = False
    """Report every chunk received (the tutorial's `Received: b'...'` lines)."""

    recv_bytes: int = 65536
    """Largest read from a connection at once."""

    max_connections: int = 20_000
    """Connections served at once; past it a new one is accepted and closed at once. 0: no
    limit. Bounded by default: a thread (or buffer) per connection is memory a flood takes."""

    max_per_ip: int = 0
    """Connections served at once from one client address; 0: no limit."""

    idle_timeout_s: float = 300.0
    """Close a connection with no byte in either direction for this long; 0: never."""

    max_lifetime_s: float = 0.0
    """Close a connection this old, however busy (bounds a client trickling bytes); 0: never."""

    max_buffer_bytes: int = 65536
    """Echo bytes held per connection at most: past it, the server stops reading that client
    until its echo is written, so a client that never reads cannot grow server memory."""

    zero_copy: bool = True
    """Echo a streaming client with splice(2) through a pipe (Linux, blocking models), so
    its bytes never enter Python; off under TLS and `log_data`, where Python must see them."""

    send_timeout_s: float = 30.0
    """Close a connection that accepts no byte of its echo for this long; 0: never."""

    tcp: bool = True
    """Serve TCP, through `mode`."""

    udp: bool = False
    """Serve UDP echo (RFC 862) on `hosts` and the same port number (`echoplex.udp`)."""

    udp_rate_per_source: float = 100.0
    """UDP datagrams answered per second per source address (IPv6: per /64), in bursts of
    up to twice that; 0: no limit. Interactive use and health checks send a few a second;
    a spoofed flood can reflect no more than this at one victim."""

    udp_rate_total: float = 10_000.0
    """UDP datagrams answered per second from all sources together, bursts of twice that;
    0: no limit. Caps what the server reflects however many addresses a flood forges, a
    fraction of what one event loop can echo, so TCP beside it keeps its share."""

    udp_max_sources: int = 65_536
    """Source addresses whose UDP rate is tracked at once: bounded memory, however many
    addresses a flood forges (a source's bucket is forgotten once it has refilled)."""

    def __post_init__(self) -> None:
        from ._net import check_host, check_unix_path  # _net reads this module's config

        for host in (*self.hosts, self.metrics_host):
            check_host(host)  # a ValueError naming it, not a UnicodeError at bind
        if self.unix_path is not None:
            check_unix_path(self.unix_path)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, not {self.port}")
        if not 1 <= self.backlog <= MAX_BACKLOG:
            raise ValueError(f"backlog must be 1 to {MAX_BACKLOG}, not {self.backlog}")
        if not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be 1 to {MAX_THREADS}, not {self.threads}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise ValueError(
                f"workers must be 0 (one per CPU) to {MAX_WORKERS}, not {self.workers}"
            )
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, not {self.loop!r}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain timeout must be 0 or more, not {self.drain_timeout_s}")
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError(
                "--proxy-protocol needs --trusted-proxy CIDR (the proxies that send the header)"
            )
        if self.trusted_proxies:
            from .proxy_protocol import parse_networks

            parse_networks(self.trusted_proxies)  # a ValueError naming the bad entry
        if not self.proxy_header_timeout_s > 0:
            raise ValueError("PROXY header timeout must be more than 0 seconds")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both a certificate and a key file")
        if not self.tls_handshake_timeout_s > 0:
            raise ValueError("TLS handshake timeout must be more than 0 seconds")
        if not 0 <= self.unix_mode <= 0o777:
            raise ValueError(
                f"unix mode must be an octal permission like 600, not {self.unix_mode:o}"
            )
        if self.recv_bytes < 1:
            raise ValueError(f"recv size must be at least 1, not {self.recv_bytes}")
        if self.max_buffer_bytes < 1:
            raise ValueError(f"max buffer must be at least 1 byte, not {self.max_buffer_bytes}")
        for name in ("max_connections", "max_per_ip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be 0 (no limit) or more")
        for name in ("idle_timeout_s", "max_lifetime_s", "send_timeout_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name[:-2].replace('_', '-')} must be 0 (none) or more seconds")
        if not (self.tcp or self.udp):
            raise ValueError("serve TCP, UDP or both")
        if self.udp and not self.hosts:
            raise ValueError("UDP needs a host to listen on")
        for name in ("udp_rate_per_source", "udp_rate_total"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name.replace('_', '-')} must be 0 (no limit) or a finite rate")
        if self.udp_max_sources < 1:
            raise ValueError(f"udp-max-sources must be at least 1, not {self.udp_max_sources}")

    @property
    def worker_count(self) -> int:
        # The CPUs this process may run on (taskset, cpusets), not all the host has.
        return self.workers or len(os.sched_getaffinity(0)) or 1
