"""The `echoplex` command: `echoplex serve | client | load | bench`."""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from . import __version__
from ._cli_util import Parser
from .commands import COMMANDS


def build_parser() -> Parser:
    parser = Parser(prog="echoplex", description="A concurrent TCP echo server toolkit.")
    parser.add_argument("--version", action="version", version=f"echoplex {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status
