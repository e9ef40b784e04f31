"""Bad input to the command line: one clear line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import socket

import pytest

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
        (["client", "--port", "99999"], "port must be 0..65535"),
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
