"""`echoplex client`: interactive like nc, or one-shot with `--message`.

The server is named as nc names it, `echoplex client HOST PORT`, or with `--host` and
`--port`; both spellings may be given if they agree."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from .._cli_util import (
    add_options,
    config_from_args,
    fail,
    host_name,
    option,
    positive_int,
    positive_seconds,
    seconds_written,
    section,
    target_port,
)
from ..client import (
    UDP_TIMEOUT_S,
    Target,
    connect,
    describe_connection_error,
    describe_failure,
    describe_udp_error,
    interact,
    interact_udp,
    one_shot,
    one_shot_udp,
    open_udp,
    stopped_quietly,
)
from ..config import DEFAULT_HOST, DEFAULT_PORT
from ..load.config import STREAM_TRANSPORT, LoadConfig
from ..tls import checked_client_context

PROG = "echoplex client"
TRANSPORT = "transport (default TCP)"

Value = TypeVar("Value", str, int)


@dataclass(frozen=True)
class ClientOptions:
    """The command's own options, each declared once (`echoplex._cli_util.option`); the
    stream transport options are `LoadConfig`'s, shared with `echoplex load`.

    `host` and `port` are None when not given as flags, so that HOST PORT, as nc takes
    them, can be told apart from them (see `address_from`)."""

    host: str | None = option(
        None, "--host", f"server address (default {DEFAULT_HOST})", parse=host_name
    )
    port: int | None = option(
        None, "--port", f"server port (default {DEFAULT_PORT})", parse=target_port
    )
    messages: tuple[str, ...] = option(
        (),
        "--message",
        "send TEXT, print the echo as the tutorial does, exit; repeatable. "
        "Without it, stdin is sent and the echo printed, like nc",
        metavar="TEXT",
        short="-m",
    )
    count: int = option(
        1, "--count", "send each --message this many times (default {default})", parse=positive_int
    )
    raw: bool = option(
        False, "--raw", "with --message, print the echoed bytes instead of their repr"
    )
    # The same kind of value as `echoplex load --timeout`, read and named the same.
    timeout_s: float | None = option(
        None,
        "--timeout",
        "give up on a connect or a read after this long (default: wait; with --udp, "
        f"{seconds_written(UDP_TIMEOUT_S)})",
        parse=positive_seconds,
    )
    udp: bool = option(
        False,
        "--udp",
        "use UDP: each message (each stdin line) is one datagram, each echo one back",
        group=TRANSPORT,
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
    # The positionals default to None, so that run() can tell what was given.
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
        type=target_port,
        metavar="PORT",
        help=f"server port, as nc takes it (default {DEFAULT_PORT}); or --port",
    )
    add_options(parser, ClientOptions)
    # The stream transport options as `echoplex load` declares them, beside --udp.
    add_options(section(parser, TRANSPORT), LoadConfig, only=STREAM_TRANSPORT)


def address_from(options: ClientOptions, args: argparse.Namespace) -> tuple[str, int]:
    """(host, port) from HOST PORT or --host and --port, else the defaults; ValueError
    if a positional and its flag disagree, or if they would be ignored (--unix)."""
    if args.unix_path and (args.host_positional is not None or args.port_positional is not None):
        raise ValueError("HOST and PORT do not go with --unix")
    host = _given_once("HOST", args.host_positional, "--host", options.host)
    port = _given_once("PORT", args.port_positional, "--port", options.port)
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


def target_from(args: argparse.Namespace, host: str, port: int) -> Target:
    """The connection the transport options describe; ValueError for bad TLS options."""
    if (args.ca_file or args.tls_insecure) and not args.tls:
        raise ValueError("--ca and --insecure go with --tls")
    if (args.cert_file or args.key_file) and not args.tls:
        raise ValueError("--cert and --key go with --tls")
    if args.key_file and not args.cert_file:
        raise ValueError("--key goes with --cert")
    if not args.tls:
        return Target(host, port, args.unix_path, None, args.send_proxy)
    context = checked_client_context(
        args.ca_file, insecure=args.tls_insecure, cert_file=args.cert_file, key_file=args.key_file
    )
    return Target(host, port, args.unix_path, context, args.send_proxy)


def messages(options: ClientOptions) -> Iterator[bytes]:
    """Each --message, --count times over, made as they are sent (a huge count costs no
    memory), as the bytes typed: argv holds bytes that are not UTF-8 as surrogates, which
    os.fsencode turns back into those bytes (`-m $'\\xff'` sends 0xff)."""
    encoded = [os.fsencode(text) for text in options.messages]
    for _ in range(options.count):
        yield from encoded


def run(args: argparse.Namespace) -> int:
    options = config_from_args(ClientOptions, args)
    try:
        host, port = address_from(options, args)
    except ValueError as exc:
        return fail(PROG, str(exc))
    if options.udp:
        if args.tls or args.unix_path or args.send_proxy:
            return fail(PROG, "--udp does not go with --tls, --unix or --send-proxy")
        return run_udp(options, host, port)
    try:
        target = target_from(args, host, port)
    except ValueError as exc:
        return fail(PROG, str(exc))
    with stopped_quietly():
        if options.messages:
            if not options.raw:
                print("Starting client...", flush=True)
            return one_shot(
                PROG, target, messages(options), raw=options.raw, timeout_s=options.timeout_s
            )
        try:
            sock = connect(target, options.timeout_s)
        except OSError as exc:
            return fail(PROG, describe_connection_error(target, exc, options.timeout_s), status=1)
        with sock:
            sock.settimeout(None)  # an interactive session may stay idle as long as it likes
            try:
                interact(sock, sys.stdin.buffer, sys.stdout.buffer)
            except OSError as exc:
                return fail(PROG, describe_failure(target, exc), status=1)
    return 0


def run_udp(options: ClientOptions, host: str, port: int) -> int:
    timeout_s = UDP_TIMEOUT_S if options.timeout_s is None else options.timeout_s
    with stopped_quietly():
        if options.messages:
            if not options.raw:
                print("Starting client...", flush=True)
            return one_shot_udp(
                PROG, host, port, messages(options), raw=options.raw, timeout_s=timeout_s
            )
        try:
            sock = open_udp(host, port)
        except OSError as exc:
            return fail(PROG, describe_udp_error(host, port, exc, timeout_s), status=1)
        with sock:
            try:
                unanswered = interact_udp(sock, sys.stdin.fileno(), sys.stdout.buffer, timeout_s)
            except OSError as exc:
                return fail(PROG, describe_udp_error(host, port, exc, timeout_s), 1)
        if unanswered:
            return fail(
                PROG,
                f"no echo of {unanswered} datagram(s) from udp {host}:{port} within {timeout_s:g}s",
                status=1,
            )
    return 0
