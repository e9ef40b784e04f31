"""The tutorial's two programs, `ServerPython.py` and `ClientPython.py`, as functions.

Their output is the tutorial's, byte for byte, on stdout and flushed at once so a
pipe can follow it live. The server is the package's own server with a reporter
that prints instead of logging, so the tutorial runs the real models.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ._cli_util import Parser, described, fail, host_name, port_number
from .client import Target, one_shot, stopped_quietly
from .config import DEFAULT_PORT, ServerConfig
from .errors import StartupError
from .events import ConnectionRecord, QuietEvents
from .models import MODELS
from .server import run

TUTORIAL_HOST = "localhost"
# A Ctrl-C in a terminal lesson should not hang on an idle nc for long.
TUTORIAL_DRAIN_TIMEOUT_S = 1.0


class TutorialPrinter(QuietEvents):
    """Prints what the tutorial's server prints; reports nothing else."""

    def __init__(self, host: str) -> None:
        self.host = host

    def listening(self, addresses: list[Any]) -> None:
        port = addresses[0][1]
        print(f"Starting server on {self.host!r} port {port}", flush=True)

    def connection_opened(self, record: ConnectionRecord) -> None:
        print("Received new connection from ", record.peer, flush=True)

    def data_received(self, record: ConnectionRecord, data: bytes) -> None:
        print("Received:", data, flush=True)


def server_main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="ServerPython.py", description="The tutorial's echo server.")
    parser.add_argument(
        "--mode",
        choices=MODELS,
        default="threads",
        help="how clients are served (default threads). "
        + described({name: entry.description for name, entry in MODELS.items()}),
    )
    parser.add_argument(
        "--host", type=host_name, default=TUTORIAL_HOST, help=f"default {TUTORIAL_HOST}"
    )
    parser.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"default {DEFAULT_PORT}; 0 picks a free port",
    )
    args = parser.parse_args(argv)
    config = replace(
        ServerConfig(),
        mode=args.mode,
        hosts=(args.host,),
        port=args.port,
        log_data=True,
        drain_timeout_s=TUTORIAL_DRAIN_TIMEOUT_S,
        idle_timeout_s=0,  # the lesson leaves nc idle for as long as it takes
    )
    try:
        run(config, TutorialPrinter(args.host))
    except StartupError as exc:
        return fail(parser.prog, str(exc))
    return 0


def client_main(argv: Sequence[str] | None = None) -> int:
    parser = Parser(prog="ClientPython.py", description="The tutorial's echo client.")
    parser.add_argument(
        "--host", type=host_name, default=TUTORIAL_HOST, help=f"default {TUTORIAL_HOST}"
    )
    parser.add_argument(
        "--port", type=port_number, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}"
    )
    parser.add_argument("--message", default="Hello, world", help="default 'Hello, world'")
    args = parser.parse_args(argv)
    with stopped_quietly():
        print("Starting client...", flush=True)
        target = Target(args.host, args.port)
        # The bytes typed: argv holds bytes that are not UTF-8 as surrogates.
        return one_shot(parser.prog, target, [os.fsencode(args.message)], raw=False)
    return 0  # stopped by SIGINT/SIGTERM: a requested stop
