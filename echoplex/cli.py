"""The `echoplex` command: `echoplex serve | client | load | bench | conditions`."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from ._cli_util import Parser
from ._version import __version__
from .commands import COMMANDS


def build_parser(command: str | None = None) -> Parser:
    """The whole parser; with `command`, that subcommand's module alone is imported (the
    others' options are not needed to parse its command line), so a server does not carry
    the load generator's and the benchmark's imports in its memory."""
    parser = Parser(prog="echoplex", description="A concurrent TCP echo server toolkit.")
    add_version_argument(parser)
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        sub.is_subcommand = True
        # Each command takes it too: the container's entrypoint is `echoplex serve`, so
        # `docker run IMAGE --version` asks `echoplex serve --version`.
        add_version_argument(sub)
        if command is not None and name != command:
            continue
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        # Commands that run as services also read their options from the environment.
        prefix = getattr(module, "ENVIRONMENT_PREFIX", None)
        if prefix:
            sub.read_environment(prefix)
        sub.set_defaults(run=module.run, parser=sub)
    return parser


def add_version_argument(parser: Parser) -> None:
    parser.add_argument(
        "--version",
        action="version",
        version=f"echoplex {__version__}",
        help="print the version and exit",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    status: int = args.run(args)
    return status
