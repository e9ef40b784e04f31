"""Help that reads as one tool: every command's options, seen as a new user sees them.

The same kind of value has one name in every command (`echoplex._cli_util.kind_of`),
a default says its unit, a section that says 0 turns its limits off holds only options
that take 0, an unknown argument is the subcommand's own error, the transport options
sit together, and a missing extra is a usage error (exit 2) wherever it is met.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from echoplex._cli_util import kind_of
from echoplex.cli import build_parser, main
from echoplex.commands import COMMANDS
from echoplex.models import MODELS

from .procs import ROOT, echoplex

pytestmark = pytest.mark.timeout(60)

# An explicit metavar other than its type's kind, and why the quantity differs.
OTHER_QUANTITY = {
    ("serve", "--bandwidth"): "RATE",  # bytes a second, read as a size is
    ("lesson", "--out"): "DIR",  # a folder, read as any path is
}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (chooser,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(chooser.choices)


def options() -> Iterator[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    """(command, its parser, option) for every option of every command but --help."""
    for command, parser in subcommands().items():
        for action in parser._actions:
            if action.option_strings and action.dest not in ("help", "version"):
                yield command, parser, action


def flag(action: argparse.Action) -> str:
    return action.option_strings[-1]


def test_every_command_is_checked() -> None:
    assert set(subcommands()) == set(COMMANDS)


def test_a_kind_of_value_has_one_metavar_in_every_command() -> None:
    for command, _, action in options():
        kind = kind_of(action.type) if callable(action.type) else None
        expected = OTHER_QUANTITY.get((command, flag(action)), kind)
        if expected is not None:
            assert action.metavar == expected, (command, flag(action), action.metavar)
    metavars: dict[str, set[object]] = {}
    for _, _, action in options():
        metavars.setdefault(flag(action), set()).add(action.metavar)
    assert {name: seen for name, seen in metavars.items() if len(seen) > 1} == {}


def test_client_and_load_timeouts_are_the_same_kind_of_value() -> None:
    parsers = subcommands()
    client, load = (
        next(a for a in parsers[command]._actions if "--timeout" in a.option_strings)
        for command in ("client", "load")
    )
    assert client.type is load.type and client.metavar == load.metavar == "DURATION"


# A duration's defaults, `(default 10s; with --udp, 2s)`, and each number in them.
DEFAULTS = re.compile(r"\(default[^)]*\)")
NUMBER = re.compile(r"(?<![\w.-])(\d+(?:\.\d+)?)([a-z]*)")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_duration_in_the_help_says_its_unit(command: str) -> None:
    durations = [
        action
        for name, _, action in options()
        if name == command and "DURATION" in str(action.metavar)
    ]
    for action in durations:
        for defaults in DEFAULTS.findall(action.help or ""):
            for number, unit in NUMBER.findall(defaults):
                assert unit in ("ms", "s", "m", "h"), (flag(action), number, action.help)
    helps = " ".join(a.help or "" for a in durations)
    if command == "serve":
        assert "(default 300s)" in helps and "(default 0s: never)" in helps
    if command in ("load", "client"):
        assert "2s)" in helps  # --timeout with --udp


def takes_zero(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args([flag(action), "0"])
    except SystemExit:
        return False
    return True


# A promise that 0 turns an option off, in its help: `default 0: no limit`, `0: never`.
ZERO_IS_OFF = re.compile(r"\b0s?: (?:no limit|never|off)|0 \(no limit\)")


def test_what_says_0_turns_it_off_takes_0() -> None:
    promised = []
    for command, parser, action in options():
        section = next(g for g in parser._action_groups if action in g._group_actions)
        if "0 turns" in (section.title or "") or ZERO_IS_OFF.search(action.help or ""):
            promised.append(flag(action))
            assert action.nargs is None and takes_zero(parser, action), (command, flag(action))
    assert {"--max-connections", "--idle-timeout", "--udp-rate", "--udp-rate-total"} <= set(
        promised
    )


def test_max_buffer_is_not_among_the_limits_0_turns_off() -> None:
    parser = subcommands()["serve"]
    (action,) = [a for a in parser._actions if "--max-buffer" in a.option_strings]
    section = next(g for g in parser._action_groups if action in g._group_actions)
    assert "0 turns" not in (section.title or "")
    assert "never off" in (action.help or "")
    assert not takes_zero(parser, action)  # the backpressure bound: 0 would be no bound


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        status = main(list(args))
    except SystemExit as exc:
        status = int(exc.code or 0)
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_argument_is_the_subcommands_error(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    for words in (["--bogus"], ["--bogus", "--bogus-too=1"]):
        status, out, err = run_cli(capsys, command, *words)
        assert (status, out) == (2, "")
        assert err == (
            f"echoplex {command}: error: unrecognized arguments: {' '.join(words)} (see --help)\n"
        )


def test_an_unknown_argument_before_the_command_is_the_top_commands_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status, _, err = run_cli(capsys, "--bogus", "serve")
    assert status == 2
    assert err == "echoplex: error: unrecognized arguments: --bogus (see --help)\n"


@pytest.mark.parametrize("command", ["client", "load"])
def test_udp_sits_with_the_other_transports(command: str) -> None:
    parser = subcommands()[command]
    (section,) = [
        group
        for group in parser._action_groups
        if any("--udp" in a.option_strings for a in group._group_actions)
    ]
    assert (section.title or "").startswith("transport")
    names = {name for action in section._group_actions for name in action.option_strings}
    assert {"--udp", "--tls", "--unix", "--send-proxy"} <= names


@pytest.fixture
def without_uvloop(tmp_path: Path) -> dict[str, str]:
    """An environment where `import uvloop` fails, as on a machine without the extra."""
    (tmp_path / "uvloop").mkdir()
    (tmp_path / "uvloop" / "__init__.py").write_text("raise ImportError('not installed')\n")
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}


@pytest.mark.parametrize(
    "words",
    [
        ["serve", "--mode", "asyncio", "--loop", "uvloop", "--port", "0"],
        ["load", "--loop", "uvloop", "--port", "1", "-d", "0.2"],
        ["load", "--loop", "uvloop", "--port", "1", "-d", "0.2", "--json"],
    ],
)
def test_a_missing_extra_is_a_usage_error_for_every_command(
    without_uvloop: dict[str, str], words: list[str]
) -> None:
    result = echoplex(*words, env=without_uvloop, timeout_s=30)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr == (
        f"echoplex {words[0]}: error: uvloop is not installed: pip install 'echoplex[uvloop]', "
        "or use --loop asyncio\n"
    )


def test_the_tutorial_servers_help_explains_every_mode() -> None:
    result = subprocess.run(
        [sys.executable, "ServerPython.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # as wrapped for the terminal, unwrapped
    for name, model in MODELS.items():
        assert f"{name}: {model.description}" in text, name
