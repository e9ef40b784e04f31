"""Bad input to the command line: one clear line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from echoplex import __version__

from .procs import Server, echoplex


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--port", "70000"], "port must be 0..65535"),
        (["serve", "--port", "-1"], "port must be 0..65535"),
        (["serve", "--port", "http"], "not a whole number"),
        (["serve", "--mode", "forking"], "invalid choice"),
        (["serve", "--threads", "0"], "must be at least 1"),
        (["serve", "--drain-timeout", "-3"], "0 or more"),
        (["serve", "--drain-timeout", "nan"], "0 or more"),
        (["serve", "--host", "no-such-host.invalid"], "cannot resolve host"),
        (["client", "--port", "99999"], "port must be 1..65535"),
        (["client", "--port", "0", "-m", "hi"], "argument --port: port must be 1..65535, not 0"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = echoplex(*args, timeout_s=30)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["threads", "asyncio", "workers"])
def test_a_busy_port_is_one_line_and_exit_2(mode: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = echoplex("serve", "--mode", mode, "--port", str(port), "--workers", "1")
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in result.stderr


def test_client_to_a_closed_port_is_one_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connects are refused
        result = echoplex("client", "--port", str(port), "-m", "hi")
    assert result.returncode == 1
    assert (
        result.stderr
        == f"echoplex client: error: cannot connect to 127.0.0.1:{port}: Connection refused\n"
    )


def test_interactive_client_echoes_stdin_and_exits_after_eof(server: Server) -> None:
    result = echoplex("client", "--port", str(server.port), input=b"line one\nline two\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "line one\nline two\n"


# ---------------------------------------------------------------- HOST PORT, as nc takes them


@pytest.fixture(scope="module")
def tcp_and_udp() -> Iterator[Server]:
    """One server echoing over TCP and UDP on the same port, for the spellings below."""
    with Server("--udp", "--tcp") as running:
        yield running


def spelt(words: list[str], server: Server) -> list[str]:
    return [word.format(host=server.host, port=server.port) for word in words]


@pytest.mark.parametrize(
    "words",
    [
        ["{host}", "{port}", "-m", "hi"],
        ["-m", "hi", "{host}", "{port}"],
        ["{host}", "--port", "{port}", "-m", "hi"],
        ["{host}", "{port}", "--host", "{host}", "--port", "{port}", "-m", "hi"],
        ["--udp", "{host}", "{port}", "-m", "hi"],
    ],
    ids=" ".join,
)
def test_client_takes_host_and_port_as_nc_does(tcp_and_udp: Server, words: list[str]) -> None:
    result = echoplex("client", *spelt(words, tcp_and_udp))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Starting client...\nReceived: b'hi'\n"


def test_interactive_client_takes_host_and_port(tcp_and_udp: Server) -> None:
    result = echoplex("client", tcp_and_udp.host, str(tcp_and_udp.port), input=b"one\ntwo\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "one\ntwo\n"


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["{host}", "{port}", "--port", "1"], "PORT {port} and --port 1 disagree: give one"),
        (["::1", "{port}", "--host", "{host}"], "HOST ::1 and --host {host} disagree: give one"),
        (["{port}"], "argument HOST: {port} is a number, not a host: give HOST PORT"),
        (["--host", "{host}", "{port}"], "argument HOST: {port} is a number, not a host"),
        (["{host}", "70000"], "argument PORT: port must be 1..65535, not 70000"),
        (["--unix", "/tmp/echoplex-none.sock", "{host}"], "HOST and PORT do not go with --unix"),
        (["{host}", "--count", "1", "{port}"], "unrecognized arguments: {port}"),
    ],
)
def test_client_host_and_port_given_twice_or_badly_are_one_line(
    tcp_and_udp: Server, words: list[str], expected: str
) -> None:
    # Each would reach the running server if the conflict went unnoticed.
    result = echoplex("client", *spelt(words, tcp_and_udp), "-m", "hi", timeout_s=30)
    assert (result.returncode, result.stdout) == (2, ""), result
    assert result.stderr.count("\n") == 1, result.stderr
    assert spelt([expected], tcp_and_udp)[0] in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------- --version


@pytest.mark.parametrize(
    "args", [["--version"], ["serve", "--version"], ["client", "--version"], ["load", "--version"]]
)
def test_version_is_printed_and_exits_0(args: list[str]) -> None:
    result = echoplex(*args, timeout_s=30)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"echoplex {__version__}\n", "")


@pytest.mark.timeout(60)
def test_durations_take_units_as_wrk_and_fortio_do() -> None:
    # 300ms, not 300 seconds: a silent client is closed for idle within the test's time.
    with Server("--idle-timeout", "300ms", "--drain-timeout", "1m", mode="threads") as server:
        with socket.create_connection(server.address, timeout=10) as silent:
            assert silent.recv(1) == b""
        server.wait_for_stderr("outcome=idle-timeout")
        assert server.stop() == 0
    shown = echoplex("serve", "--help").stdout
    assert "--idle-timeout DURATION" in shown
    refused = echoplex("serve", "--idle-timeout", "5 parsecs")
    assert refused.returncode == 2
    assert "not a duration: '5 parsecs' (seconds, or with a unit: 500ms, 10s, 1m, 2h)" in (
        refused.stderr
    )
    assert len(refused.stderr.splitlines()) == 1


@pytest.mark.timeout(60)
def test_load_durations_take_units() -> None:
    with Server(mode="threads") as server:
        host, port = server.address
        ran = echoplex(
            "load", "--host", host, "--port", str(port), "-c", "2", "-d", "300ms", "--json"
        )
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["duration_s"] == 0.3
    assert report["requests"] > 0 and report["errors"] == 0 and report["mismatches"] == 0
