"""`echoplex serve`: the echo server, any model, logging to stderr.

Its options are `ServerConfig`'s, declared beside each field (`echoplex.config`) and
generated here; only the logging options, which are not part of the server's
configuration, are the command's own.
"""

from __future__ import annotations

import argparse

from .. import logs
from .._cli_util import add_options, config_from_args, fail, flags_for_settings
from ..config import ServerConfig
from ..errors import StartupError
from ..server import run as run_server

ENVIRONMENT_PREFIX = "ECHOPLEX_"
PROG = "echoplex serve"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, ServerConfig)
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


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(ServerConfig, args)
    except ValueError as exc:
        return fail(PROG, flags_for_settings(str(exc), ServerConfig))
    logs.configure(args.log_level, args.log_format, show_process=config.mode == "workers")
    try:
        run_server(config)
    except StartupError as exc:
        return fail(PROG, str(exc))
    return 0
