"""`echoplex load`: drive an echo server with verified traffic and report what came back."""

from __future__ import annotations

import argparse
import os
import ssl
import sys

from .._cli_util import (
    add_stream_transport_arguments,
    fail,
    host_name,
    non_negative_seconds,
    positive_int,
    positive_rate,
    positive_seconds,
)
from .._cli_util import size_bytes as _any_size
from ..client import UDP_TIMEOUT_S
from ..config import DEFAULT_PORT, LOOPS
from ..errors import StartupError
from ..load.config import MAX_DATAGRAM_BYTES, MAX_SIZE_BYTES, PATTERNS, LoadConfig
from ..tls import client_context

PROG = "echoplex load"
EXIT_INTERRUPTED = 130


def size_bytes(text: str) -> int:
    return _any_size(text, MAX_SIZE_BYTES)


def target_port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1..65535, not {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "Every echoed byte is checked against what was sent. Exit status: 0 when all "
        "of it came back right; 1 on any mismatch or connection error (the summary "
        "names the connection and offset), or when the server cannot be reached; "
        "2 on bad arguments. Ctrl-C stops early and still reports."
    )
    patterns = "; ".join(f"{name}: {text}" for name, text in PATTERNS.items())
    parser.add_argument(
        "--host", type=host_name, default="127.0.0.1", help="server address (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port",
        type=target_port,
        default=DEFAULT_PORT,
        help=f"server port (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "--pattern",
        choices=PATTERNS,
        default="pingpong",
        help=f"traffic pattern (default pingpong). {patterns}",
    )
    parser.add_argument(
        "-c",
        "--connections",
        type=positive_int,
        default=LoadConfig.connections,
        help=f"connections to open (default {LoadConfig.connections})",
    )
    parser.add_argument(
        "-s",
        "--size",
        type=size_bytes,
        default=LoadConfig.size_bytes,
        metavar="BYTES",
        help="bytes per message; K/KiB/M/MiB are powers of 1024, KB/MB of 1000 "
        f"(default {LoadConfig.size_bytes})",
    )
    parser.add_argument(
        "-d",
        "--duration",
        type=positive_seconds,
        default=LoadConfig.duration_s,
        metavar="SECONDS",
        help="measured time; for hold, how long connections stay idle "
        f"(default {LoadConfig.duration_s:g})",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_seconds,
        default=LoadConfig.warmup_s,
        metavar="SECONDS",
        help="traffic before the measured time, left out of every figure (default 0)",
    )
    parser.add_argument(
        "--rate",
        type=positive_rate,
        default=None,
        metavar="PER_S",
        help="with --pattern rate (required there): messages per second, all connections together",
    )
    parser.add_argument(
        "--window",
        type=size_bytes,
        default=None,
        metavar="BYTES",
        help=f"with --pattern stream: bytes in flight per connection "
        f"(default {LoadConfig.window_bytes // 1024}KiB)",
    )
    parser.add_argument(
        "--connect-rate",
        type=positive_rate,
        default=None,
        metavar="PER_S",
        help="new connections per second while opening (default: as fast as they open)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=None,
        metavar="SECONDS",
        help="a connect, or an echo making no progress, fails after this long; also how "
        f"long the end waits for echoes in flight (default {LoadConfig.timeout_s:g}); "
        f"with --udp, a datagram not echoed this long after it was sent is lost "
        f"(default {UDP_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--seed", type=int, default=LoadConfig.seed, help="seed of the payload bytes (default 0)"
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default="auto",
        help="event loop (default auto: uvloop if installed)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with every figure instead of the summary",
    )
    transport = parser.add_argument_group(
        "transport (as `echoplex client`; default TCP to --host:--port)"
    )
    add_stream_transport_arguments(transport)
    transport.add_argument(
        "--udp",
        action="store_true",
        help="UDP echo: each connection a UDP socket, each message one datagram of at most "
        f"{MAX_DATAGRAM_BYTES:,} bytes, verified; pingpong and rate only. A datagram not "
        "echoed within --timeout is lost, an error. Start the server with --udp-rate 0 "
        "--udp-rate-total 0 (or limits above the load), or its reflection guard drops most",
    )


def config_from(args: argparse.Namespace) -> LoadConfig:
    if args.window is not None and args.pattern != "stream":
        raise ValueError("--window applies only to --pattern stream")
    window = args.window if args.window is not None else LoadConfig.window_bytes
    if args.ca is not None and args.tls:
        _check_ca_file(args.ca)
    if args.timeout is not None:
        timeout = args.timeout
    else:
        timeout = UDP_TIMEOUT_S if args.udp else LoadConfig.timeout_s
    return LoadConfig(
        host=args.host,
        port=args.port,
        pattern=args.pattern,
        connections=args.connections,
        size_bytes=args.size,
        duration_s=args.duration,
        warmup_s=args.warmup,
        rate_per_s=args.rate,
        window_bytes=window,
        connect_rate_per_s=args.connect_rate,
        timeout_s=timeout,
        seed=args.seed,
        loop=args.loop,
        unix_path=args.unix,
        tls=args.tls,
        ca_file=args.ca,
        tls_insecure=args.insecure,
        send_proxy=args.send_proxy,
        udp=args.udp,
    )


def _check_ca_file(path: str) -> None:
    """A CA file that is missing or not PEM certificates is a bad argument (exit 2), as
    with `echoplex client`, not a failed run."""
    if not os.path.isfile(path):
        raise ValueError(f"no such CA file: {path}")
    try:
        client_context(path)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise ValueError(f"cannot load CA file {path}: {reason}") from None


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except ValueError as exc:
        return fail(PROG, str(exc))
    # Imported here: `echoplex serve` builds this parser too, and needs none of it.
    from ..load import engine, report

    try:
        with report.live_progress() as progress:
            result = engine.run(config, progress)
    except StartupError as exc:
        return fail(PROG, str(exc), status=1)
    except KeyboardInterrupt:
        # Only before the run's own signal handling is in place (or after it ended).
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(report.to_json(result) if args.json else report.format_summary(result), flush=True)
    return 0 if result.ok else 1
