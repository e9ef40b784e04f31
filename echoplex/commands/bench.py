from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .._cli_util import (
    add_options,
    argv_of,
    config_from_args,
    fail,
    non_negative_int,
    non_negative_seconds,
    option,
    positive_int,
    positive_seconds,
)
from ..bench import SCENARIOS, SERVERS, BenchSettings, run_bench
from ..bench.crosscheck import CrossCheckUnavailable
from ..bench.crosscheck import build as build_cross_check
from ..bench.report import markdown, write_results
from ..bench.runner import INSTALL_HINT, missing_packages, selected, servers_for
from ..bench.scenarios import ALL
from ..bench.servers import ServerSpec, custom_server
from ..load.config import connection_count

PROG = "echoplex bench"
# Relative to where the bench runs; from a checkout's top that is an ignored directory
# (.gitignore), beside the tracked bench/results, so running the bench as the docs say
# never changes a tracked file.
DEFAULT_OUT = Path("bench/out")


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


def _connection_counts(text: str) -> tuple[int, ...]:
    """`100,1000`: connection counts, each as `echoplex load -c` takes it, in order."""
    counts = tuple(dict.fromkeys(connection_count(part.strip()) for part in text.split(",")))
    return tuple(sorted(counts))


def _custom_server(text: str) -> ServerSpec:
    try:
        return custom_server(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class BenchOptions:
    """The command's options, each declared once (`echoplex._cli_util.option`): the
    parser is generated from them, and so is the command line that reproduces a run
    (`command_line`). `settings` hands them to the bench as `BenchSettings`."""

    scenarios: tuple[str, ...] = option(
        ("concurrency",),
        "--scenario",
        "what load to apply; repeat to run several (default concurrency). "
        + "; ".join(f"{name}: {scenario.description}" for name, scenario in SCENARIOS.items())
        + f"; all: {', '.join(ALL)}",
        choices=(*SCENARIOS, "all"),
    )
    models: tuple[str, ...] | None = option(
        None,
        "--models",
        "servers to run, comma-separated: models "
        f"({', '.join(n for n, s in SERVERS.items() if s.kind == 'model')}) and/or reference "
        f"servers ({', '.join(n for n, s in SERVERS.items() if s.kind == 'baseline')}) "
        f"(default: every model{_scenario_defaults('models')})",
        parse=_server_list,
        metavar="NAME,...",
        show=",".join,
    )
    connections: tuple[int, ...] | None = option(
        None,
        "--connection-counts",
        "run each scenario's load points at these connection counts instead of its own, "
        "comma-separated (scale: instead of 100, 1,000, 10,000 and the descriptor limit)",
        parse=_connection_counts,
        metavar="N,...",
        show=lambda counts: ",".join(map(str, counts)),
    )
    servers: tuple[ServerSpec, ...] = option(
        (),
        "--server",
        "also run any echo server, in any language: COMMAND runs through /bin/sh with "
        "{port} replaced by a free port it must listen on at 127.0.0.1; pinned, loaded, "
        "measured (its whole process tree) and ranked like the others, unless it echoes a "
        "wrong byte; repeatable",
        parse=_custom_server,
        metavar="NAME='COMMAND {port}'",
        show=lambda spec: f"{spec.name}={spec.command}",
    )
    baselines: bool = option(
        False,
        "--baselines",
        "also run the reference servers: stdlib socketserver, asyncio and uvloop "
        "Protocol echoes (echoplex/bench/baselines/; ref-uvloop only where uvloop is "
        "installed)",
    )
    duration_s: float | None = option(
        None,
        "--duration",
        "measured time per run (default 2s; smoke 500ms)",
        parse=positive_seconds,
        metavar="DURATION",
    )
    warmup_s: float | None = option(
        None,
        "--warmup",
        "unmeasured load before each run (default 500ms; smoke 200ms)",
        parse=non_negative_seconds,
        metavar="DURATION",
    )
    warmup_connections: int = option(
        1,
        "--warmup-connections",
        "how every server is readied once it listens, before its load: N connections "
        "one after another, each echoing 64 bytes (checked) and closed (default {default}; 0: "
        "the load's connections are the first the server ever accepts)",
        parse=non_negative_int,
        metavar="N",
    )
    cross_check: bool = option(
        False,
        "--cross-check",
        "also drive every server, at ping-pong load points, with an independent C "
        "epoll client (built with the system's cc on first use, cached in "
        "~/.cache/echoplex) and report where the two load generators' ratios differ by "
        "more than 15%%",
    )
    repeat: int = option(
        1,
        "--repeat",
        "runs per server and load point, servers taking turns; medians reported "
        "(default {default})",
        parse=positive_int,
        metavar="N",
    )
    reference: str | None = option(
        None,
        "--reference",
        "server the vs_baseline ratios are relative to, built in or a --server "
        "(default ref-uvloop with "
        f"--baselines, else asyncio{_scenario_defaults('reference')})",
        metavar="NAME",
    )
    no_pin: bool = option(
        False,
        "--no-pin",
        "do not pin the server and the load generator to separate CPUs with taskset",
    )
    # (`option` makes a dataclasses.field; ruff cannot tell, as Path is not a type it
    # knows to be immutable.)
    out: Path = option(  # noqa: RUF009
        DEFAULT_OUT,
        "--out",
        "write results.json, results.md and PNG charts into DIR, created if needed; the "
        "charts an earlier run wrote there that this one does not are removed (default "
        "{default}, which git ignores: the committed bench/results are rewritten only by "
        "`python -m echoplex.bench.regenerate`)",
        parse=Path,
        metavar="DIR",
    )
    quiet: bool = option(False, "--quiet", "no progress lines on stderr, only warnings", short="-q")

    def settings(self) -> BenchSettings:
        """What the bench runs (`--server`s given twice are refused by `run` first)."""
        return BenchSettings(
            scenarios=selected(self.scenarios),
            servers=self.models,
            baselines=self.baselines,
            custom_servers=self.servers,
            duration_s=self.duration_s,
            warmup_s=self.warmup_s,
            repeat=self.repeat,
            pin=not self.no_pin,
            reference=self.reference,
            warmup_connections=self.warmup_connections,
            cross_check=self.cross_check,
            connections=self.connections,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, BenchOptions)


def run(args: argparse.Namespace) -> int:
    options = config_from_args(BenchOptions, args)
    # Before anything starts: a long run must not end in a table of `-`, nor fail at
    # the charts after it.
    if missing := missing_packages():
        verb = "is" if len(missing) == 1 else "are"
        return fail(PROG, f"{' and '.join(missing)} {verb} not installed: {INSTALL_HINT}")
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Progress lines are ours; other libraries (matplotlib) stay at warnings.
    logging.getLogger("echoplex").setLevel(logging.WARNING if options.quiet else logging.INFO)
    names = [spec.name for spec in options.servers]
    if twice := next((name for name in names if names.count(name) > 1), None):
        return fail(PROG, f"--server: server name {twice!r} is given twice")
    settings = options.settings()
    if problem := _unrunnable(options, settings):
        return fail(PROG, problem)
    try:
        # Now, so that a missing compiler stops nothing half-way; built once, here.
        binary = build_cross_check() if settings.cross_check else None
    except CrossCheckUnavailable as exc:
        return fail(PROG, str(exc))
    try:
        report = run_bench(settings, command_line(options), cross_check_binary=binary)
    except KeyboardInterrupt:
        return fail(PROG, "interrupted", 130)
    try:
        write_results(report, options.out)
    except OSError as exc:
        return fail(PROG, f"cannot write results to {options.out}: {exc}")
    print(markdown(report), end="")
    liars = sorted(
        {row.server for result in report.scenarios for row in result.rows if not row.verified}
    )
    if liars:
        return fail(PROG, f"wrong echoes from {', '.join(liars)}: not ranked", 1)
    return 0


def _unrunnable(options: BenchOptions, settings: BenchSettings) -> str | None:
    """Why the run cannot start, before it starts anything: exit status 2, as for a bad
    flag, since the command line asks for what cannot run here (README, "exit status 2")."""
    known = settings.specs()
    reference = options.reference
    if reference and reference not in known:
        return f"--reference {reference}: no such server (choose from {', '.join(known)})"
    # A server asked for by name must run; `--baselines` runs the ones it can, and says so.
    for name in dict.fromkeys([*(options.models or ()), *([reference] if reference else [])]):
        if reason := known[name].unavailable_reason():
            return reason
    for name in settings.scenarios:
        if reference and reference not in servers_for(SCENARIOS[name], settings):
            return f"--reference {reference} is not among the servers {name} runs"
    return None


def command_line(options: BenchOptions) -> str:
    """The command that reproduces this run, for the results files: every option but
    --quiet, which changes no figure, and the scenarios even when they are the default."""
    flags = argv_of(options, leave_out=("quiet",), keep_defaults=("scenarios",))
    return shlex.join(["echoplex", "bench", *flags])
