"""`echoplex bench`: run every model (and reference servers) under the same load and
report requests/s, MB/s, latency, server CPU per request, peak memory and errors."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from .._cli_util import fail, non_negative_int, non_negative_seconds, positive_int, positive_seconds
from ..bench import SCENARIOS, SERVERS, BenchSettings, run_bench
from ..bench.crosscheck import CrossCheckUnavailable
from ..bench.crosscheck import build as build_cross_check
from ..bench.report import markdown, write_results
from ..bench.runner import INSTALL_HINT, missing_packages, selected, servers_for
from ..bench.scenarios import ALL
from ..bench.servers import ServerSpec, custom_server

PROG = "echoplex bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scenarios = "; ".join(f"{name}: {scenario.description}" for name, scenario in SCENARIOS.items())
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[*SCENARIOS, "all"],
        help=f"what load to apply; repeat to run several (default concurrency). {scenarios}; "
        f"all: {', '.join(ALL)}",
    )
    parser.add_argument(
        "--models",
        type=_server_list,
        metavar="NAME,...",
        help="servers to run, comma-separated: models "
        f"({', '.join(n for n, s in SERVERS.items() if s.kind == 'model')}) and/or reference "
        f"servers ({', '.join(n for n, s in SERVERS.items() if s.kind == 'baseline')}) "
        f"(default: every model{_scenario_defaults('models')})",
    )
    parser.add_argument(
        "--server",
        action="append",
        type=_custom_server,
        metavar="NAME='COMMAND {port}'",
        help="also run any echo server, in any language: COMMAND runs through /bin/sh with "
        "{port} replaced by a free port it must listen on at 127.0.0.1; pinned, loaded, "
        "measured (its whole process tree) and ranked like the others, unless it echoes a "
        "wrong byte; repeatable",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also run the reference servers: stdlib socketserver, asyncio and uvloop "
        "Protocol echoes (echoplex/bench/baselines/; ref-uvloop only where uvloop is "
        "installed)",
    )
    parser.add_argument(
        "--duration",
        type=positive_seconds,
        metavar="DURATION",
        help="measured time per run (default 2s; smoke 500ms)",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_seconds,
        metavar="DURATION",
        help="unmeasured load before each run (default 500ms; smoke 200ms)",
    )
    parser.add_argument(
        "--warmup-connections",
        type=non_negative_int,
        default=1,
        metavar="N",
        help="how every server is readied once it listens, before its load: N connections "
        "one after another, each echoing 64 bytes (checked) and closed (default 1; 0: "
        "the load's connections are the first the server ever accepts)",
    )
    parser.add_argument(
        "--cross-check",
        action="store_true",
        help="also drive every server, at ping-pong load points, with an independent C "
        "epoll client (built with the system's cc on first use, cached in "
        "~/.cache/echoplex) and report where the two load generators' ratios differ by "
        "more than 15%%",
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=1,
        metavar="N",
        help="runs per server and load point, servers taking turns; medians reported (default 1)",
    )
    parser.add_argument(
        "--reference",
        metavar="NAME",
        help="server the vs_baseline ratios are relative to, built in or a --server "
        "(default ref-uvloop with "
        f"--baselines, else asyncio{_scenario_defaults('reference')})",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the server and the load generator to separate CPUs with taskset",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write results.json, results.md and PNG charts into DIR (created if needed)",
    )
    parser.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress lines on stderr, only warnings",
    )


def _scenario_defaults(setting: str) -> str:
    """`; SCENARIO: VALUE` for each scenario with its own `models` or `reference`."""
    parts = []
    for name, scenario in SCENARIOS.items():
        value = getattr(scenario, setting)
        if value:
            parts.append(f"; {name}: {value if isinstance(value, str) else ','.join(value)}")
    return "".join(parts)


def _server_list(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in SERVERS]
    if unknown or not names:
        what = ", ".join(map(repr, unknown)) or repr(text)
        raise argparse.ArgumentTypeError(
            f"unknown server {what} (choose from {', '.join(SERVERS)})"
        )
    return names


def _custom_server(text: str) -> ServerSpec:
    try:
        return custom_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    # Before anything starts: a long run must not end in a table of `-`, nor fail at
    # the charts after it.
    if missing := missing_packages(charts=args.out is not None):
        verb = "is" if len(missing) == 1 else "are"
        return fail(PROG, f"{' and '.join(missing)} {verb} not installed: {INSTALL_HINT}", 1)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Progress lines are ours; other libraries (matplotlib) stay at warnings.
    logging.getLogger("echoplex").setLevel(logging.WARNING if args.quiet else logging.INFO)
    custom: list[ServerSpec] = []
    for spec in args.server or ():
        if spec.name in (each.name for each in custom):
            return fail(PROG, f"--server: server name {spec.name!r} is given twice")
        custom.append(spec)
    settings = BenchSettings(
        scenarios=selected(args.scenario or ["concurrency"]),
        servers=args.models,
        baselines=args.baselines,
        custom_servers=tuple(custom),
        duration_s=args.duration,
        warmup_s=args.warmup,
        repeat=args.repeat,
        pin=not args.no_pin,
        reference=args.reference,
        warmup_connections=args.warmup_connections,
        cross_check=args.cross_check,
    )
    known = settings.specs()
    if args.reference and args.reference not in known:
        choices = ", ".join(known)
        return fail(PROG, f"--reference {args.reference}: no such server (choose from {choices})")
    # A server asked for by name must run; `--baselines` runs the ones it can, and says so.
    for name in dict.fromkeys(
        [*(args.models or ()), *([args.reference] if args.reference else [])]
    ):
        if reason := known[name].unavailable_reason():
            return fail(PROG, reason, 1)
    for name in settings.scenarios:
        if args.reference and args.reference not in servers_for(SCENARIOS[name], settings):
            return fail(PROG, f"--reference {args.reference} is not among the servers {name} runs")
    if args.cross_check:
        try:
            build_cross_check()  # now, so that a missing compiler stops nothing half-way
        except CrossCheckUnavailable as exc:
            return fail(PROG, str(exc), 1)
    try:
        report = run_bench(settings, command_line(args))
    except KeyboardInterrupt:
        return fail(PROG, "interrupted", 130)
    if args.out is not None:
        try:
            write_results(report, args.out)
        except OSError as exc:
            return fail(PROG, f"cannot write results to {args.out}: {exc}")
    print(markdown(report), end="")
    liars = sorted(
        {row.server for result in report.scenarios for row in result.rows if not row.verified}
    )
    if liars:
        return fail(PROG, f"wrong echoes from {', '.join(liars)}: not ranked", 1)
    return 0


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, for the results files."""
    argv = ["echoplex", "bench"]
    for scenario in args.scenario or ["concurrency"]:
        argv += ["--scenario", scenario]
    if args.models:
        argv += ["--models", ",".join(args.models)]
    for spec in args.server or ():
        argv += ["--server", f"{spec.name}={spec.command}"]
    if args.baselines:
        argv.append("--baselines")
    for flag, value in (("--duration", args.duration), ("--warmup", args.warmup)):
        if value is not None:
            argv += [flag, f"{value:g}"]
    if args.repeat != 1:
        argv += ["--repeat", str(args.repeat)]
    if args.warmup_connections != 1:
        argv += ["--warmup-connections", str(args.warmup_connections)]
    if args.cross_check:
        argv.append("--cross-check")
    if args.reference:
        argv += ["--reference", args.reference]
    if args.no_pin:
        argv.append("--no-pin")
    if args.out is not None:
        argv += ["--out", str(args.out)]
    return shlex.join(argv)
