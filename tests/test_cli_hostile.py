"""Hostile values on every argument, and flags against the environment.

Every bad value, given as a flag or as an `ECHOPLEX_*` variable, is one line on stderr
and exit status 2, never a traceback; text is sent as the bytes typed; a flag wins over
the environment however it is spelt, and abbreviations are not accepted at all.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from echoplex import run
from echoplex.cli import build_parser
from echoplex.config import ServerConfig
from echoplex.errors import StartupError
from echoplex.load.config import LoadConfig

from .procs import ROOT, Process, Server, echoplex
from .test_contract import recv_exactly

LONG_LABEL = "a" * 64 + ".x"  # IDNA refuses a label over 63 characters
NOT_UTF8 = os.fsdecode(b"\xff")  # how argv holds a byte that is not UTF-8: a surrogate
LONG_UNIX_PATH = "/tmp/" + "x" * 200
CLIENT = [sys.executable, "-m", "echoplex", "client"]
TUTORIAL_CLIENT = [sys.executable, "ClientPython.py", "--host", "127.0.0.1"]


def one_line_exit_2(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr, result.stderr


HOSTILE = [
    # Host names IDNA refuses fail in socket before any OSError: caught at the parser.
    (["serve", "--host", LONG_LABEL], "argument --host: not a host name"),
    (["serve", "--host", NOT_UTF8], "argument --host: not a host name"),
    (["serve", "--host", "a..b"], "argument --host: not a host name"),
    (["serve", "--host", ""], "argument --host: empty host"),
    (["serve", "--host", "[::1]"], "--host: write an IPv6 address without brackets: ::1"),
    (["serve", "--metrics-port", "0", "--metrics-host", "[::1]"], "without brackets: ::1"),
    (["serve", "--metrics-port", "0", "--metrics-host", LONG_LABEL], "--metrics-host: not a"),
    (["client", "--host", LONG_LABEL, "-m", "x"], "argument --host: not a host name"),
    (["client", "--udp", "--host", NOT_UTF8, "-m", "x"], "argument --host: not a host name"),
    (["client", "--host", "", "-m", "x"], "argument --host: empty host"),
    (["load", "--host", LONG_LABEL], "argument --host: not a host name"),
    (["load", "--host", "."], "argument --host: not a host name"),
    # Unix socket paths: empty, or longer than sun_path holds.
    (["serve", "--unix", ""], "argument --unix: empty Unix socket path"),
    (["serve", "--unix", LONG_UNIX_PATH], "argument --unix: Unix socket path too long"),
    (["client", "--unix", LONG_UNIX_PATH, "-m", "x"], "Unix socket path too long"),
    (["load", "--unix", LONG_UNIX_PATH], "Unix socket path too long"),
    (["client", "--unix", "", "-m", "x"], "argument --unix: empty Unix socket path"),
    # PROXY protocol networks, TLS files.
    (["serve", "--proxy-protocol", "--trusted-proxy", "10.0.0.0/33"], "invalid trusted proxy"),
    (["serve", "--proxy-protocol", "--trusted-proxy", NOT_UTF8], "invalid trusted proxy"),
    (["serve", "--tls-cert", NOT_UTF8, "--tls-key", NOT_UTF8], "cannot load TLS certificate"),
    (
        ["serve", "--tls-cert", "pyproject.toml", "--tls-key", "pyproject.toml"],
        "cannot load TLS certificate",
    ),
    (["client", "--tls", "--ca", NOT_UTF8, "-m", "x"], "no such CA file"),
    (["client", "--tls", "--ca", "pyproject.toml", "-m", "x"], "cannot load CA file"),
    (["load", "--tls", "--ca", "pyproject.toml"], "cannot load CA file"),
    (["load", "--tls", "--ca", ""], "argument --ca: not a file path"),
    # Numbers with units, numbers a C type cannot hold, durations, ports.
    (["serve", "--max-buffer", "9" * 5000], "argument --max-buffer: not a size in bytes"),
    (["serve", "--max-buffer", "99999999999999999999G"], "must be 1 byte to 1GiB"),
    (["load", "--size", "1Ki B"], "argument -s/--size: not a size in bytes"),
    (["serve", "--port", "9" * 5000], "argument --port: not a whole number"),
    (["serve", "--backlog", "99999999999999999999"], "argument --backlog: must be at most"),
    (["serve", "--workers", "99999999999999999999"], "argument --workers: must be at most"),
    (["serve", "--threads", "99999999"], "argument --threads: must be at most"),
    (
        ["serve", "--idle-timeout", "1e300"],
        "argument --idle-timeout: must be 0 or more seconds",
    ),
    (
        ["serve", "--drain-timeout", "inf"],
        "argument --drain-timeout: must be 0 or more seconds",
    ),
    (
        ["client", "--timeout", "1e300", "-m", "x"],
        "argument --timeout: must be 0 or more seconds",
    ),
    (
        ["load", "--timeout", "1e300"],
        "argument --timeout: must be 0 or more seconds",
    ),
    (
        ["load", "--duration", "1e300"],
        "argument -d/--duration: must be 0 or more seconds",
    ),
    (["load", "--rate", "nan", "--pattern", "rate"], "argument --rate: must be a finite"),
    (["load", "--port", "0"], "argument --port: port must be 1..65535"),
    (["client", "--port", "65536", "-m", "x"], "argument --port: port must be 1..65535"),
    (["serve", "--metrics-port", "99999"], "argument --metrics-port: port must be 0..65535"),
    (
        ["bench", "--duration", "1e300"],
        "argument --duration: must be 0 or more seconds",
    ),
    # Abbreviations are refused: `--max-conn` is not taken for `--max-connections`.
    (["serve", "--max-conn", "3"], "unrecognized arguments: --max-conn 3"),
    (["client", "--mess", "x"], "unrecognized arguments: --mess (see --help)"),
    (["load", "--conn", "3"], "unrecognized arguments: --conn 3"),
    (["bench", "--dur", "1"], "unrecognized arguments: --dur 1"),
]


@pytest.mark.parametrize(("args", "expected"), HOSTILE, ids=lambda v: repr(v)[:60])
def test_hostile_values_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    one_line_exit_2(echoplex(*args, timeout_s=30), expected)


def test_a_line_break_in_a_value_stays_on_one_line() -> None:
    one_line_exit_2(echoplex("serve", "--host", "a\nb..c", timeout_s=30), r"'a\nb..c'")


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("ServerPython.py", ["--host", LONG_LABEL], "argument --host: not a host name"),
        ("ClientPython.py", ["--host", LONG_LABEL], "argument --host: not a host name"),
        ("ClientPython.py", ["--host", NOT_UTF8], "argument --host: not a host name"),
        ("ClientPython.py", ["--mess", "x"], "unrecognized arguments: --mess x"),
    ],
)
def test_tutorial_scripts_take_hostile_values_in_one_line(
    script: str, args: list[str], expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    one_line_exit_2(result, expected)


# ---------------------------------------------------------------- flags win


def parse_serve(argv: list[str], monkeypatch: pytest.MonkeyPatch, **environment: str) -> object:
    for name in [n for n in os.environ if n.startswith("ECHOPLEX_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return build_parser("serve").parse_args(["serve", *argv])


@pytest.mark.parametrize(
    ("argv", "variable", "value", "dest", "expected"),
    [
        (["--max-connections", "3"], "ECHOPLEX_MAX_CONNECTIONS", "7", "max_connections", 3),
        (["--max-connections=3"], "ECHOPLEX_MAX_CONNECTIONS", "7", "max_connections", 3),
        ([], "ECHOPLEX_MAX_CONNECTIONS", "7", "max_connections", 7),
        (["--host", "::1"], "ECHOPLEX_HOST", "10.0.0.1,10.0.0.2", "hosts", ["::1"]),
        ([], "ECHOPLEX_HOST", "10.0.0.1,10.0.0.2", "hosts", ["10.0.0.1", "10.0.0.2"]),
        (["--zero-copy"], "ECHOPLEX_ZERO_COPY", "off", "zero_copy", True),
        (["--no-zero-copy"], "ECHOPLEX_ZERO_COPY", "on", "zero_copy", False),
        ([], "ECHOPLEX_ZERO_COPY", "off", "zero_copy", False),
        (["--mode=pool"], "ECHOPLEX_MODE", "asyncio", "mode", "pool"),
        (
            ["--trusted-proxy=::1"],
            "ECHOPLEX_TRUSTED_PROXY",
            "10.0.0.0/8",
            "trusted_proxies",
            ["::1"],
        ),
    ],
)
def test_a_flag_wins_over_the_environment_however_spelt(
    argv: list[str],
    variable: str,
    value: str,
    dest: str,
    expected: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = parse_serve(argv, monkeypatch, **{variable: value})
    assert getattr(args, dest) == expected


def test_the_environment_does_not_outlive_its_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser("serve")
    monkeypatch.setenv("ECHOPLEX_MAX_PER_IP", "9")
    assert parser.parse_args(["serve"]).max_per_ip == 9
    monkeypatch.delenv("ECHOPLEX_MAX_PER_IP")
    assert parser.parse_args(["serve"]).max_per_ip == 0


def test_serve_help_names_the_variable_of_every_option() -> None:
    result = echoplex("serve", "--help", timeout_s=30)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # help wraps lines anywhere
    parser = build_parser("serve").parse_args(["serve"]).parser
    options = [a for a in parser._actions if a.dest not in ("help", "version")]
    assert options
    for action in options:
        long_option = next(o for o in action.option_strings if o.startswith("--"))
        variable = "ECHOPLEX_" + long_option[2:].upper().replace("-", "_")
        assert f"[env {variable}]" in text, long_option
    assert "A flag wins over the environment" in text


def held_echo(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(b"x")
    assert recv_exactly(sock, 1) == b"x"
    return sock


@pytest.mark.parametrize("spelling", [["--max-connections=2"], ["--max-connections", "2"]])
def test_a_running_server_takes_the_flag_not_the_variable(
    spelling: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ECHOPLEX_MAX_CONNECTIONS", "1")
    with Server(*spelling) as server:
        # With the variable's limit of 1 the second connection would be closed at once.
        with held_echo(server.address), held_echo(server.address):
            pass


def test_a_running_server_takes_the_variable_without_a_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ECHOPLEX_MAX_CONNECTIONS", "1")
    with Server() as server, held_echo(server.address):
        with socket.create_connection(server.address, timeout=10) as extra:
            assert extra.recv(1) == b""  # accepted and closed: over the limit of 1


# ---------------------------------------------------------------- bytes as typed


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_client_sends_the_bytes_typed(transport: str) -> None:
    udp = ["--udp"] if transport == "udp" else []
    with Server(*udp, "--tcp") as server:  # UDP on the port of the TCP listener it logs
        result = subprocess.run(
            [*CLIENT, *udp, "--port", str(server.port), "--raw", "-m", NOT_UTF8, "-m", "é"],
            cwd=ROOT,
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"\xff" + "é".encode()
    assert result.stderr == b""


def test_tutorial_client_sends_the_bytes_typed() -> None:
    with Server() as server:
        result = subprocess.run(
            [*TUTORIAL_CLIENT, "--port", str(server.port), "--message", NOT_UTF8],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Starting client...\nReceived: b'\\xff'\n"
    assert result.stderr == ""


# ---------------------------------------------------------------- the API too


@pytest.mark.parametrize(
    "fields",
    [
        {"hosts": (LONG_LABEL,)},
        {"hosts": ("127.0.0.1", "a\0b")},
        {"metrics_host": NOT_UTF8},
        {"unix_path": LONG_UNIX_PATH},
        {"unix_path": ""},
        {"backlog": 2**31},
        {"workers": 10**6},
        # Ranges the parser's types declare, which the API once did not check.
        {"metrics_port": 70000},
        {"tls_handshake_timeout_s": 1e300},
        {"max_buffer_bytes": 2**31},
        {"proxy_protocol": True, "trusted_proxies": ("10.0.0.1/8",)},
    ],
)
def test_the_server_config_refuses_what_the_cli_refuses(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ServerConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields", [{"host": LONG_LABEL}, {"host": ""}, {"unix_path": LONG_UNIX_PATH}]
)
def test_the_load_config_refuses_what_the_cli_refuses(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LoadConfig(**fields)  # type: ignore[arg-type]


def test_an_empty_variable_counts_as_unset() -> None:
    # A template that leaves ECHOPLEX_HOST= empty must not make a server that listens nowhere.
    env = {"ECHOPLEX_HOST": "", "ECHOPLEX_TCP": " "}
    with Process(
        [sys.executable, "-m", "echoplex", "serve", "--port", "0", "--mode", "simple"], env=env
    ) as server:
        server.wait_for_stderr(r"listening on 127\.0\.0\.1:\d+")


def test_config_replace_keeps_resolved_defaults() -> None:
    from dataclasses import replace

    assert replace(LoadConfig(), connections=5).connections == 5  # the resolved window passes
    assert ServerConfig(unix_path="/tmp/x.sock").hosts == ()
    assert ServerConfig(udp=True).tcp is False
    assert LoadConfig(udp=True).timeout_s == 2.0
    nowhere = replace(ServerConfig(unix_path="/tmp/x.sock"), unix_path=None)
    assert nowhere.hosts == ()  # replace keeps resolved values: the server says so at start
    with pytest.raises(StartupError, match="nothing to listen on"):
        run(replace(nowhere, port=0))
