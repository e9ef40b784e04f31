"""`echoplex load`: drive an echo server with verified traffic and report what came back."""

from __future__ import annotations

import argparse
import json
import sys

from .._cli_util import add_options, config_from_args, fail, flags_for_settings
from ..errors import StartupError
from ..load.config import LoadConfig
from ..load.config import message_size as size_bytes
from ..load.result import config_json

PROG = "echoplex load"
EXIT_INTERRUPTED = 130
__all__ = ["add_arguments", "config_from", "run", "size_bytes"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`LoadConfig`'s options, declared beside its fields, and `--json`, the command's own."""
    parser.epilog = (
        "Every echoed byte is checked against what was sent. Exit status: 0 when all "
        "of it came back right; 1 on any mismatch or connection error (the summary "
        "names the connection and offset), or when the server cannot be reached; "
        "2 on bad arguments, or when an extra the run needs is not installed. With "
        "--json a run that fails still prints one JSON object, with an `error` field. "
        "Ctrl-C stops early and still reports."
    )
    add_options(parser, LoadConfig)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with every figure instead of the summary",
    )


def config_from(args: argparse.Namespace) -> LoadConfig:
    """The run the options describe; a ValueError naming the flags for a bad one."""
    try:
        config = config_from_args(LoadConfig, args)
    except ValueError as exc:
        raise ValueError(flags_for_settings(str(exc), LoadConfig)) from None
    # Built here, once: a CA file, certificate or key that cannot be used is a bad
    # argument (exit 2), as with `echoplex client`, not a failed run; the run uses it.
    _ = config.tls_context
    # Imported here: `echoplex serve` builds this parser too, and needs none of it.
    from ..load.processes import check_dependencies

    try:
        # A missing extra is a usage error (exit 2), as for `echoplex serve
        # --metrics-port` without prometheus-client: the run it describes cannot start here.
        check_dependencies(config)
    except StartupError as exc:
        raise ValueError(str(exc)) from None
    return config


def run(args: argparse.Namespace) -> int:
    """Bad arguments (exit 2) are one line on stderr, with or without --json: argparse
    finds most of them before it knows whether --json was given, and they describe no
    run. Every failure of a run (exit 1, or 130 when stopped before it began) is one
    line on stderr and, with --json, a JSON object with an `error` field on stdout."""
    try:
        config = config_from(args)
    except ValueError as exc:
        return fail(PROG, str(exc))
    # Imported here: `echoplex serve` builds this parser too, and needs none of it.
    from ..load import processes, report

    try:
        # `run` checks what the run needs (hdrhistogram, the loop) before anything starts.
        with report.live_progress() as progress:
            result = processes.run(config, progress)
    except StartupError as exc:
        return _failed(args, config, str(exc), 1)
    except KeyboardInterrupt:
        # Only before the run's own signal handling is in place (or after it ended).
        return _failed(args, config, "interrupted", EXIT_INTERRUPTED)
    except Exception as exc:
        # A bug: the traceback follows, but a --json reader still gets an object.
        if args.json:
            print(error_json(config, f"internal error: {exc!r}"), flush=True)
        raise
    print(report.to_json(result) if args.json else report.format_summary(result), flush=True)
    return 0 if result.ok else 1


def error_json(config: LoadConfig, message: str) -> str:
    """A run that failed, as `iperf3 -J` reports one: what was asked, and the error."""
    return json.dumps({"ok": False, "error": message, **config_json(config)}, ensure_ascii=False)


def _failed(args: argparse.Namespace, config: LoadConfig, message: str, status: int) -> int:
    if args.json:
        print(error_json(config, message), flush=True)
    if status == EXIT_INTERRUPTED:
        print(f"{PROG}: {message}", file=sys.stderr)
        return status
    return fail(PROG, message, status=status)
