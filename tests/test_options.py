"""Options declared once: every command's parser comes from its settings' declarations.

`echoplex client` and `echoplex bench` declare their options beside the fields of a
frozen dataclass, as `serve` and `load` do (`echoplex._cli_util.option`); a range is
declared once, in the option's `Bounded` type, and refuses the same values in the same
words on the command line and through the API.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import math
import shlex
from dataclasses import fields
from typing import Any

import pytest

from echoplex._cli_util import Bounded, argv_of, config_from_args, options_of
from echoplex.cli import build_parser
from echoplex.commands.bench import BenchOptions, command_line
from echoplex.commands.client import ClientOptions
from echoplex.config import ServerConfig
from echoplex.models import threads
from echoplex.plan import resolve

from .procs import ROOT, Server, echoplex

pytestmark = pytest.mark.timeout(60)


def parsed(command: str, *words: str) -> argparse.Namespace:
    return build_parser(command).parse_args([command, *words])


def refusal(command: str, *words: str) -> str:
    """The parser's one-line error for these words (it exits with status 2)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        parsed(command, *words)
    assert exited.value.code == 2
    assert stderr.getvalue().count("\n") == 1, stderr.getvalue()
    return stderr.getvalue()


# ---------------------------------------------------------------- echoplex client


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["127.0.0.1", "0"], "argument PORT: port must be 1..65535, not 0"),
        (["--port", "0"], "argument --port: port must be 1..65535, not 0"),
        (["--count", "0"], "argument --count: must be at least 1, not 0"),
        (["--timeout", "-1"], "argument --timeout: must be 0 or more seconds"),
    ],
)
def test_the_client_refuses_what_its_declarations_refuse(words: list[str], expected: str) -> None:
    result = echoplex("client", *words, "-m", "hi", timeout_s=30)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_the_client_takes_its_declared_options() -> None:
    with Server() as server:
        words = ["--port", str(server.port), "-m", "a", "--message", "b", "--count", "2"]
        result = echoplex("client", *words, "--timeout", "10s", "--raw", timeout_s=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "abab"


def test_the_client_parser_defaults_are_the_declared_ones() -> None:
    assert config_from_args(ClientOptions, parsed("client")) == ClientOptions()


# ---------------------------------------------------------------- echoplex bench

# A value other than the default for every option of `echoplex bench`, as typed.
BENCH_FLAGS: dict[str, list[str]] = {
    "scenarios": ["--scenario", "smoke", "--scenario", "targets"],
    "models": ["--models", "asyncio,ref-socketserver"],
    "servers": ["--server", "mine=./my-echo --port {port}"],
    "baselines": ["--baselines"],
    "duration_s": ["--duration", "1.5s"],
    "warmup_s": ["--warmup", "250ms"],
    "warmup_connections": ["--warmup-connections", "0"],
    "cross_check": ["--cross-check"],
    "repeat": ["--repeat", "3"],
    "connections": ["--connection-counts", "10,50"],
    "reference": ["--reference", "asyncio"],
    "no_pin": ["--no-pin"],
    "out": ["--out", "bench/results/x"],
    "quiet": ["-q"],
}


def test_every_bench_option_has_a_case_below() -> None:
    assert set(BENCH_FLAGS) == {f.name for f, _ in options_of(BenchOptions)}


@pytest.mark.parametrize("name", BENCH_FLAGS)
def test_each_bench_flag_round_trips_from_its_declaration(name: str) -> None:
    options = config_from_args(BenchOptions, parsed("bench", *BENCH_FLAGS[name]))
    default = next(f.default for f in fields(BenchOptions) if f.name == name)
    assert getattr(options, name) != default
    assert {f.name for f in fields(BenchOptions) if getattr(options, f.name) != f.default} == {name}
    again = config_from_args(BenchOptions, parsed("bench", *argv_of(options)))
    assert again == options
    if name != "quiet":  # no figure depends on it: not in the results' command line
        recorded = shlex.split(command_line(options))[2:]
        assert config_from_args(BenchOptions, parsed("bench", *recorded)) == options


def test_the_bench_command_line_names_the_scenario_and_leaves_quiet_out() -> None:
    options = config_from_args(BenchOptions, parsed("bench", "--quiet", "--duration", "3"))
    # A duration is written with its unit, as the help writes the defaults.
    assert command_line(options) == "echoplex bench --scenario concurrency --duration 3s"


def test_the_bench_parser_defaults_are_the_declared_ones() -> None:
    assert config_from_args(BenchOptions, parsed("bench")) == BenchOptions()
    assert BenchOptions().settings().scenarios == ("concurrency",)


# ---------------------------------------------------------------- ranges, declared once


def out_of_range(bounds: Bounded) -> list[Any]:
    """Values just outside `bounds`: below it, and above it where its top is a number
    (not infinity, nor the largest float: adding 1 to those changes nothing)."""
    below = bounds.least if bounds.least_excluded is not None else bounds.least - 1
    values = [type(bounds.least)(below)]
    if bounds.most < 1e18:
        values.append(bounds.most + 1)
    return values


RANGED = [
    (config_field.name, declared, value)
    for config_field, declared in options_of(ServerConfig)
    if isinstance(declared.parse, Bounded)
    for value in out_of_range(declared.parse)
]


def test_every_number_serve_takes_has_a_declared_range() -> None:
    numbers = {
        f.name
        for f, declared in options_of(ServerConfig)
        if declared.parse is not None and f.type in ("int", "float", "int | None")
    }
    assert numbers <= {name for name, _, _ in RANGED}
    assert {"port", "metrics_port", "backlog", "max_buffer_bytes"} <= numbers


@pytest.mark.parametrize(
    ("name", "declared", "value"), RANGED, ids=[f"{n}={v}" for n, _, v in RANGED]
)
def test_serve_and_its_config_refuse_the_same_values_in_the_same_words(
    name: str, declared: Any, value: Any
) -> None:
    text = declared.written(value)
    words = refusal("serve", f"{declared.flag}={text}")
    prefix = f"echoplex serve: error: argument {declared.flag}: "
    assert words.startswith(prefix), words
    problem = words.removeprefix(prefix).removesuffix(" (see --help)\n")
    with pytest.raises(ValueError) as refused:
        ServerConfig(**{name: value})
    assert str(refused.value) == f"`{name}`: {problem}"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_duration_through_the_api_is_finite(value: float) -> None:
    with pytest.raises(ValueError, match="`idle_timeout_s`: must be 0 or more seconds"):
        ServerConfig(idle_timeout_s=value)


def test_trusted_proxies_are_parsed_once_and_the_plan_hands_them_on() -> None:
    given = {"hosts": ("127.0.0.1",), "port": 0, "trusted_proxies": ("10.0.0.0/8,::1",)}
    config = ServerConfig(**given, proxy_protocol=True)  # type: ignore[arg-type]
    assert [str(network) for network in config.trusted_networks] == ["10.0.0.0/8", "::1/128"]
    with resolve(config, threads) as plan:
        assert len(plan.trusted_proxies) == 2
        for handed_on, parsed_once in zip(
            plan.trusted_proxies, config.trusted_networks, strict=True
        ):
            assert handed_on is parsed_once
    with resolve(ServerConfig(**given), threads) as plan:  # type: ignore[arg-type]
        assert plan.trusted_proxies == []  # without --proxy-protocol, nobody sends a header


def test_the_tutorial_imports_no_command() -> None:
    # The layer below the commands: what it needs of the client lives in echoplex.client.
    tree = ast.parse((ROOT / "echoplex" / "tutorial.py").read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert "client" in imported
    assert not [name for name in imported if name.startswith("commands")]
