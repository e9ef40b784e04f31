"""`echoplex serve`: the echo server, any model, logging to stderr."""

from __future__ import annotations

import argparse
import math

from .. import logs
from .._cli_util import (
    at_most,
    fail,
    file_path,
    host_name,
    non_negative_int,
    non_negative_seconds,
    octal_mode,
    port_number,
    positive_int,
    positive_seconds,
    size_bytes,
    unix_socket_path,
)
from ..config import (
    DEFAULT_BACKLOG,
    DEFAULT_PORT,
    LOOPS,
    MAX_BACKLOG,
    MAX_THREADS,
    MAX_WORKERS,
    ServerConfig,
)
from ..errors import StartupError
from ..models import DESCRIPTIONS, MODELS
from ..server import run as run_server

ENVIRONMENT_PREFIX = "ECHOPLEX_"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models = "; ".join(f"{name}: {text}" for name, text in DESCRIPTIONS.items())
    parser.add_argument(
        "--mode",
        choices=MODELS,
        default="threads",
        help=f"concurrency model (default threads). {models}",
    )
    parser.add_argument(
        "--host",
        action="append",
        type=host_name,
        dest="hosts",
        metavar="HOST",
        help="address to listen on, repeatable; `::` serves IPv6 and IPv4 (default 127.0.0.1, "
        "or none when --unix is given)",
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"port to listen on, 0 for any free one (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--backlog",
        type=at_most(MAX_BACKLOG, positive_int),
        default=DEFAULT_BACKLOG,
        help=f"listen backlog (default {DEFAULT_BACKLOG})",
    )
    parser.add_argument(
        "--threads",
        type=at_most(MAX_THREADS, positive_int),
        default=ServerConfig.threads,
        help=f"worker threads of the pool model (default {ServerConfig.threads})",
    )
    parser.add_argument(
        "--workers",
        type=at_most(MAX_WORKERS, non_negative_int),
        default=0,
        help="processes of the workers model (default 0: one per CPU)",
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop of asyncio/workers (default auto: uvloop if installed)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=non_negative_seconds,
        default=ServerConfig.drain_timeout_s,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long open connections may finish (default 5)",
    )
    parser.add_argument(
        "--unix",
        type=unix_socket_path,
        metavar="PATH",
        help="also listen on this Unix domain socket path",
    )
    parser.add_argument(
        "--unix-mode",
        type=octal_mode,
        default=ServerConfig.unix_mode,
        metavar="MODE",
        help="permissions of the --unix socket file, in octal (default 600)",
    )
    tls_group = parser.add_argument_group("TLS")
    tls_group.add_argument(
        "--tls-cert", type=file_path, metavar="FILE", help="PEM certificate chain"
    )
    tls_group.add_argument("--tls-key", type=file_path, metavar="FILE", help="PEM private key")
    tls_group.add_argument(
        "--tls-handshake-timeout",
        type=positive_seconds,
        default=ServerConfig.tls_handshake_timeout_s,
        metavar="SECONDS",
        help="drop a client that has not finished its handshake by then (default 10)",
    )
    proxy_group = parser.add_argument_group("PROXY protocol (behind HAProxy and the like)")
    proxy_group.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="require a PROXY v1/v2 header from --trusted-proxy peers; logs and limits "
        "then see the real client",
    )
    proxy_group.add_argument(
        "--trusted-proxy",
        action="append",
        dest="trusted_proxies",
        default=[],
        metavar="CIDR",
        help="a network whose connections carry the header (repeatable; commas allowed)",
    )
    proxy_group.add_argument(
        "--proxy-header-timeout",
        type=positive_seconds,
        default=ServerConfig.proxy_header_timeout_s,
        metavar="SECONDS",
        help="drop a proxied connection with no complete header by then (default 5)",
    )
    metrics_group = parser.add_argument_group("metrics")
    metrics_group.add_argument(
        "--metrics-port",
        type=port_number,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on /metrics and health on /healthz (needs "
        "echoplex[metrics])",
    )
    metrics_group.add_argument(
        "--metrics-host",
        type=host_name,
        default=ServerConfig.metrics_host,
        metavar="HOST",
        help=f"address of the metrics endpoint (default {ServerConfig.metrics_host})",
    )
    limits = parser.add_argument_group("limits (0 turns a limit off)")
    limits.add_argument(
        "--max-connections",
        type=non_negative_int,
        default=ServerConfig.max_connections,
        metavar="N",
        help="connections served at once; more are accepted and closed at once "
        f"(default {ServerConfig.max_connections})",
    )
    limits.add_argument(
        "--max-per-ip",
        type=non_negative_int,
        default=ServerConfig.max_per_ip,
        metavar="N",
        help="connections at once from one client address (default 0)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=non_negative_seconds,
        default=ServerConfig.idle_timeout_s,
        metavar="SECONDS",
        help="close a connection silent both ways this long "
        f"(default {ServerConfig.idle_timeout_s:g})",
    )
    limits.add_argument(
        "--max-lifetime",
        type=non_negative_seconds,
        default=ServerConfig.max_lifetime_s,
        metavar="SECONDS",
        help="close a connection this old, however busy (default 0: never)",
    )
    limits.add_argument(
        "--max-buffer",
        type=size_bytes,
        default=ServerConfig.max_buffer_bytes,
        metavar="BYTES",
        help="echo bytes held per connection before it stops being read (default 64KiB)",
    )
    parser.add_argument(
        "--zero-copy",
        action=argparse.BooleanOptionalAction,
        default=ServerConfig.zero_copy,
        help="echo streaming clients with splice(2), bytes never entering Python "
        "(Linux; threads and simple models; not with TLS or --log-data; default on)",
    )
    limits.add_argument(
        "--send-timeout",
        type=non_negative_seconds,
        default=ServerConfig.send_timeout_s,
        metavar="SECONDS",
        help="close a connection that takes none of its echo this long "
        f"(default {ServerConfig.send_timeout_s:g})",
    )
    udp_group = parser.add_argument_group(
        "UDP echo (RFC 862), rate-limited against reflection (0 turns a rate limit off)"
    )
    udp_group.add_argument(
        "--udp",
        action="store_true",
        help="serve UDP echo; alone, UDP only (with --tcp, both on the same port)",
    )
    udp_group.add_argument(
        "--tcp", action="store_true", help="serve TCP (the default unless --udp is given)"
    )
    udp_group.add_argument(
        "--udp-rate",
        type=datagram_rate,
        default=ServerConfig.udp_rate_per_source,
        metavar="PER_S",
        help="datagrams answered per second per source address, bursts of twice that "
        f"(default {ServerConfig.udp_rate_per_source:g})",
    )
    udp_group.add_argument(
        "--udp-rate-total",
        type=datagram_rate,
        default=ServerConfig.udp_rate_total,
        metavar="PER_S",
        help="datagrams answered per second from all sources, bursts of twice that "
        f"(default {ServerConfig.udp_rate_total:g})",
    )
    udp_group.add_argument(
        "--udp-max-sources",
        type=positive_int,
        default=ServerConfig.udp_max_sources,
        metavar="N",
        help="source addresses whose rate is tracked at once "
        f"(default {ServerConfig.udp_max_sources})",
    )
    parser.add_argument(
        "--log-data",
        action="store_true",
        help="log every chunk received, as the tutorial prints it",
    )
    parser.add_argument(
        "--log-level",
        choices=logs.LOG_LEVELS,
        default="info",
        help="least severe log level shown (default info)",
    )
    parser.add_argument(
        "--log-format",
        choices=logs.LOG_FORMATS,
        default="text",
        help="text lines, or one JSON object per line (default text)",
    )


def config_from(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        mode=args.mode,
        hosts=tuple(args.hosts or ([] if args.unix else ["127.0.0.1"])),
        unix_path=args.unix,
        proxy_protocol=args.proxy_protocol,
        trusted_proxies=tuple(args.trusted_proxies),
        proxy_header_timeout_s=args.proxy_header_timeout,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        unix_mode=args.unix_mode,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
        tls_handshake_timeout_s=args.tls_handshake_timeout,
        port=args.port,
        backlog=args.backlog,
        threads=args.threads,
        workers=args.workers,
        loop=args.loop,
        drain_timeout_s=args.drain_timeout,
        log_data=args.log_data,
        max_connections=args.max_connections,
        max_per_ip=args.max_per_ip,
        idle_timeout_s=args.idle_timeout,
        max_lifetime_s=args.max_lifetime,
        max_buffer_bytes=args.max_buffer,
        send_timeout_s=args.send_timeout,
        zero_copy=args.zero_copy,
        tcp=args.tcp or not args.udp,
        udp=args.udp,
        udp_rate_per_source=args.udp_rate,
        udp_rate_total=args.udp_rate_total,
        udp_max_sources=args.udp_max_sources,
    )


def datagram_rate(text: str) -> float:
    """Datagrams per second: a finite number, 0 (no limit) or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of datagrams a second: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite rate, 0 (no limit) or more, not {text}")
    return value


def run(args: argparse.Namespace) -> int:
    prog = "echoplex serve"
    try:
        config = config_from(args)
    except ValueError as exc:
        return fail(prog, str(exc))
    logs.configure(args.log_level, args.log_format, show_process=config.mode == "workers")
    try:
        run_server(config)
    except StartupError as exc:
        return fail(prog, str(exc))
    return 0
