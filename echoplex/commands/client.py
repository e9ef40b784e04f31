"""`echoplex client`: interactive like nc, or one-shot with `--message`.

The server is named as nc names it, `echoplex client HOST PORT`, or with `--host` and
`--port`; both spellings may be given if they agree."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import TypeVar

from .._cli_util import (
    add_options,
    fail,
    host_name,
    non_negative_seconds,
    port_number,
    positive_int,
)
from ..client import (
    UDP_TIMEOUT_S,
    EchoMismatch,
    Target,
    connect,
    datagram_round_trip,
    describe_connection_error,
    describe_udp_error,
    interact,
    interact_udp,
    open_udp,
    round_trip,
)
from ..config import DEFAULT_HOST, DEFAULT_PORT
from ..load.config import STREAM_TRANSPORT, LoadConfig
from ..tls import client_context

PROG = "echoplex client"

Value = TypeVar("Value", str, int)


def one_shot(
    prog: str,
    target: Target,
    messages: Iterable[bytes],
    *,
    raw: bool,
    timeout_s: float | None = None,
) -> int:
    """Send each message in turn on one connection, printing each echo; the exit status."""
    try:
        sock = connect(target, timeout_s)
    except OSError as exc:
        return fail(prog, describe_connection_error(target, exc), status=1)

    def failed(exc: OSError) -> str:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or exc
        return f"connection to {target} failed: {reason}"

    return _print_echoes(prog, sock, messages, round_trip, failed, raw=raw)


def _print_echoes(
    prog: str,
    sock: socket.socket,
    messages: Iterable[bytes],
    exchange: Callable[[socket.socket, bytes], bytes],
    failed: Callable[[OSError], str],
    *,
    raw: bool,
) -> int:
    """One-shot use over TCP or UDP: `exchange` each message, print each echo as it comes
    back (the tutorial's `Received: b'...'`, or the bytes with `raw`), close; the exit
    status. A wrong echo or a failure (worded by `failed`) ends it with status 1."""
    with sock:
        for message in messages:
            try:
                echoed = exchange(sock, message)
            except EchoMismatch as exc:
                return fail(prog, str(exc), status=1)
            except OSError as exc:
                return fail(prog, failed(exc), status=1)
            if raw:
                sys.stdout.buffer.write(echoed)
                sys.stdout.buffer.flush()
            else:
                print("Received:", echoed, flush=True)
    return 0


class _Stopped(Exception):
    pass


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


@contextlib.contextmanager
def stopped_quietly() -> Iterator[None]:
    """SIGINT/SIGTERM end the block at once, with no traceback: a requested stop."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def one_shot_udp(
    prog: str,
    host: str,
    port: int,
    messages: Iterable[bytes],
    *,
    raw: bool,
    timeout_s: float = UDP_TIMEOUT_S,
) -> int:
    """Send each message as a datagram in turn, printing each echo; the exit status."""
    try:
        sock = open_udp(host, port)
    except OSError as exc:
        return fail(prog, describe_udp_error(host, port, exc, timeout_s), status=1)
    sock.settimeout(timeout_s)
    return _print_echoes(
        prog,
        sock,
        messages,
        datagram_round_trip,
        lambda exc: describe_udp_error(host, port, exc, timeout_s),
        raw=raw,
    )


def positional_host(text: str) -> str:
    """HOST as nc takes it; a number is refused: `echoplex client 12345` or `--host H 12345`
    means a port, and a host spelt as one number (0.0.48.57) is never what was meant."""
    if text.isdigit():
        raise argparse.ArgumentTypeError(
            f"{text} is a number, not a host: give HOST PORT, or --port {text}"
        )
    return host_name(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Positionals and flags default to None, so that run() can tell what was given.
    parser.add_argument(
        "host_positional",
        nargs="?",
        type=positional_host,
        metavar="HOST",
        help=f"server address, as nc takes it (default {DEFAULT_HOST}); or --host",
    )
    parser.add_argument(
        "port_positional",
        nargs="?",
        type=port_number,
        metavar="PORT",
        help=f"server port, as nc takes it (default {DEFAULT_PORT}); or --port",
    )
    parser.add_argument(
        "--host", type=host_name, default=None, help=f"server address (default {DEFAULT_HOST})"
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=None,
        help=f"server port (default {DEFAULT_PORT})",
    )
    parser.add_argument(
        "-m",
        "--message",
        action="append",
        metavar="TEXT",
        help="send TEXT, print the echo as the tutorial does, exit; repeatable. "
        "Without it, stdin is sent and the echo printed, like nc",
    )
    parser.add_argument(
        "--count",
        type=positive_int,
        default=1,
        help="send each --message this many times (default 1)",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="with --message, print the echoed bytes instead of their repr",
    )
    parser.add_argument(
        "--timeout",
        type=non_negative_seconds,
        default=None,
        metavar="SECONDS",
        help="give up on a connect or a read after this long (default: wait; with --udp, "
        f"{UDP_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--udp",
        action="store_true",
        help="use UDP: each message (each stdin line) is one datagram, each echo one back",
    )
    # The stream transport options as `echoplex load` declares them, under the flags'
    # own names (`args.unix`, `args.ca`).
    transport = parser.add_argument_group("transport (default TCP)")
    add_options(transport, LoadConfig, only=STREAM_TRANSPORT, dest_from_flag=True)


def address_from(args: argparse.Namespace) -> tuple[str, int]:
    """(host, port) from HOST PORT or --host and --port, else the defaults; ValueError
    if a positional and its flag disagree, or if they would be ignored (--unix)."""
    if args.unix and (args.host_positional is not None or args.port_positional is not None):
        raise ValueError("HOST and PORT do not go with --unix")
    host = _given_once("HOST", args.host_positional, "--host", args.host)
    port = _given_once("PORT", args.port_positional, "--port", args.port)
    return (
        DEFAULT_HOST if host is None else host,
        DEFAULT_PORT if port is None else port,
    )


def _given_once(
    positional: str, by_position: Value | None, flag: str, by_flag: Value | None
) -> Value | None:
    if by_position is not None and by_flag is not None and by_position != by_flag:
        raise ValueError(f"{positional} {by_position} and {flag} {by_flag} disagree: give one")
    return by_flag if by_position is None else by_position


def target_from(args: argparse.Namespace) -> Target:
    """The connection the options describe; ValueError/OSError for bad TLS options."""
    if (args.ca or args.insecure) and not args.tls:
        raise ValueError("--ca and --insecure go with --tls")
    if args.ca and not os.path.isfile(args.ca):
        raise ValueError(f"no such CA file: {args.ca}")
    context = client_context(args.ca, insecure=args.insecure) if args.tls else None
    return Target(args.host, args.port, args.unix, context, args.send_proxy)


def messages(args: argparse.Namespace) -> Iterator[bytes]:
    """Each --message, --count times over, made as they are sent (a huge count costs no
    memory), as the bytes typed: argv holds bytes that are not UTF-8 as surrogates, which
    os.fsencode turns back into those bytes (`-m $'\\xff'` sends 0xff)."""
    encoded = [os.fsencode(text) for text in args.message]
    for _ in range(args.count):
        yield from encoded


def run(args: argparse.Namespace) -> int:
    try:
        args.host, args.port = address_from(args)
    except ValueError as exc:
        return fail(PROG, str(exc))
    if args.udp:
        if args.tls or args.unix or args.send_proxy:
            return fail(PROG, "--udp does not go with --tls, --unix or --send-proxy")
        return run_udp(args)
    try:
        target = target_from(args)
    except (ValueError, ssl.SSLError) as exc:
        return fail(PROG, str(exc))
    with stopped_quietly():
        if args.message:
            if not args.raw:
                print("Starting client...", flush=True)
            return one_shot(PROG, target, messages(args), raw=args.raw, timeout_s=args.timeout)
        try:
            sock = connect(target, args.timeout)
        except OSError as exc:
            return fail(PROG, describe_connection_error(target, exc), status=1)
        with sock:
            sock.settimeout(None)  # an interactive session may stay idle as long as it likes
            try:
                interact(sock, sys.stdin.buffer, sys.stdout.buffer)
            except OSError as exc:
                return fail(PROG, f"connection failed: {exc.strerror or exc}", status=1)
    return 0


def run_udp(args: argparse.Namespace) -> int:
    timeout_s = UDP_TIMEOUT_S if args.timeout is None else args.timeout
    if not timeout_s > 0:
        return fail(PROG, "--timeout must be more than 0 with --udp")
    with stopped_quietly():
        if args.message:
            if not args.raw:
                print("Starting client...", flush=True)
            return one_shot_udp(
                PROG, args.host, args.port, messages(args), raw=args.raw, timeout_s=timeout_s
            )
        try:
            sock = open_udp(args.host, args.port)
        except OSError as exc:
            return fail(PROG, describe_udp_error(args.host, args.port, exc, timeout_s), status=1)
        with sock:
            try:
                unanswered = interact_udp(sock, sys.stdin.fileno(), sys.stdout.buffer, timeout_s)
            except OSError as exc:
                return fail(PROG, describe_udp_error(args.host, args.port, exc, timeout_s), 1)
        if unanswered:
            return fail(
                PROG,
                f"no echo of {unanswered} datagram(s) from udp {args.host}:{args.port} "
                f"within {timeout_s:g}s",
                status=1,
            )
    return 0
