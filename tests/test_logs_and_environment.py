"""The log lines a server writes (the start, connections, the stop; text and
`--log-format json`), and options from ECHOPLEX_* environment variables."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

import echoplex

from .procs import LISTENING, ROOT, Process, Server
from .test_cli_hostile import LONG_LABEL, LONG_UNIX_PATH, NOT_UTF8
from .test_contract import recv_exactly
from .waiting import wait_for


@pytest.mark.parametrize("mode", ["threads", "asyncio", "workers"])
def test_json_logs_are_one_object_per_line_with_the_connection_fields(mode: str) -> None:
    with Server("--log-format", "json", "--workers", "1", mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"json please")
            assert recv_exactly(sock, 11) == b"json please"
            host, port = sock.getsockname()[:2]
        server.wait_for_stderr('"event": "close"')
        assert server.stop() == 0
    entries = [json.loads(line) for line in server.stderr.splitlines()]
    closes = [e for e in entries if e.get("event") == "close"]
    assert len(closes) == 1
    close = closes[0]
    assert close["peer"] == f"{host}:{port}"
    assert close["bytes_in"] == close["bytes_out"] == 11
    assert close["outcome"] == "closed"
    assert close["duration_s"] >= 0
    assert close["level"] == "info" and close["timestamp"].endswith("+00:00")
    assert any(e.get("event") == "open" and e["peer"] == f"{host}:{port}" for e in entries)


def serve_with_environment(env: dict[str, str], *args: str) -> Process:
    return Process([sys.executable, "-m", "echoplex", "serve", *args], env=env)


def test_environment_sets_options_and_flags_win() -> None:
    env = {
        "ECHOPLEX_PORT": "0",
        "ECHOPLEX_MODE": "asyncio",
        "ECHOPLEX_LOG_DATA": "yes",
        "ECHOPLEX_HOST": "127.0.0.1,127.0.0.2",
        "ECHOPLEX_DRAIN_TIMEOUT": "60",
    }
    with serve_with_environment(env, "--drain-timeout", "0.2") as server:
        match = server.wait_for_stderr(LISTENING)
        server.wait_for_stderr(r"listening on 127\.0\.0\.2:")  # a list from one variable
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=10) as sock:
            sock.sendall(b"env")
            assert recv_exactly(sock, 3) == b"env"
            server.wait_for_stderr(r"Received: b'env'")  # ECHOPLEX_LOG_DATA
            server.signal()
            # The flag's 0.2 s drain won over the variable's 60 s: we are cut off soon.
            assert sock.recv(10) == b""
        assert server.wait() == 0


def test_mode_from_the_environment_is_used() -> None:
    env = {"ECHOPLEX_MODE": "workers", "ECHOPLEX_WORKERS": "2", "ECHOPLEX_PORT": "0"}
    with serve_with_environment(env) as server:
        server.wait_for_stderr("2 workers running")


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("ECHOPLEX_PORT", "99999", "ECHOPLEX_PORT='99999': port must be 0..65535"),
        ("ECHOPLEX_MODE", "fork", "ECHOPLEX_MODE='fork': choose from simple"),
        ("ECHOPLEX_LOG_DATA", "maybe", "ECHOPLEX_LOG_DATA='maybe': expected 1/0"),
        # Hostile values (more in test_cli_hostile.py): one line too, never a traceback.
        ("ECHOPLEX_HOST", f"127.0.0.1,{LONG_LABEL}", f"ECHOPLEX_HOST='127.0.0.1,{LONG_LABEL}'"),
        ("ECHOPLEX_METRICS_HOST", NOT_UTF8, "ECHOPLEX_METRICS_HOST="),
        ("ECHOPLEX_UNIX", LONG_UNIX_PATH, "Unix socket path too long"),
        ("ECHOPLEX_IDLE_TIMEOUT", "1e300", "at most a year (31536000)"),
        ("ECHOPLEX_MAX_BUFFER", "1T", "not a size in bytes"),
    ],
)
def test_a_bad_environment_value_is_one_line(variable: str, value: str, expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "echoplex", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, variable: value},
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr
    assert "Traceback" not in result.stderr


def test_a_misspelt_variable_is_warned_about() -> None:
    env = {"ECHOPLEX_PORT": "0", "ECHOPLEX_IDLE_TIMOUT": "5"}
    with serve_with_environment(env) as server:
        server.wait_for_stderr(LISTENING)
        assert "echoplex serve: warning: ignoring ECHOPLEX_IDLE_TIMOUT: no such option" in (
            server.stderr
        )
        assert "ECHOPLEX_PORT" not in server.stderr


def server_lines(stderr: str) -> list[str]:
    """The messages of the `echoplex.server` logger, in order (text format)."""
    return re.findall(r" echoplex\.server: (.*)", stderr)


@pytest.mark.parametrize(
    ("mode", "options", "loop"),
    [
        ("threads", (), "none"),  # blocking: no event loop...
        ("threads", ("--udp", "--tcp"), "asyncio"),  # ... but UDP beside it has one
        ("asyncio", (), "asyncio"),
        ("workers", ("--udp", "--tcp"), "asyncio"),
    ],
)
def test_the_first_line_says_what_runs_and_the_last_that_it_stopped(
    mode: str, options: tuple[str, ...], loop: str
) -> None:
    with Server(
        "--loop", "asyncio", "--workers", "1", "--drain-timeout", "0.2", *options, mode=mode
    ) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"held")
            assert recv_exactly(sock, 4) == b"held"
            server.wait_for_stderr(r"echoplex\.server: open ")
            server.signal()
            assert sock.recv(10) == b""  # cut off when the drain ran out
        assert server.wait() == 0
    lines = server_lines(server.stderr)
    assert lines[0] == f"starting echoplex {echoplex.__version__} (model {mode}, loop {loop})"
    assert lines[1].startswith("listening on")
    assert lines[-1] == "stopped"
    # After everything else: the drained connection's close, and the UDP echo's end.
    assert re.match(r"close .* outcome=drained", lines[-2]) or "udp: stopped" in lines[-2]
    assert any("outcome=drained" in line for line in lines[:-1])
    assert lines.count("stopped") == 1


def test_json_start_and_stop_lines_carry_their_fields() -> None:
    with Server("--log-format", "json", "--loop", "asyncio", mode="asyncio") as server:
        assert server.stop() == 0
    entries = [json.loads(line) for line in server.stderr.splitlines()]
    events = [entry for entry in entries if entry["logger"] == "echoplex.server"]
    start, stop = events[0], events[-1]
    assert start["event"] == "starting"
    assert (start["version"], start["model"], start["loop"]) == (
        echoplex.__version__,
        "asyncio",
        "asyncio",
    )
    assert stop["event"] == "stopped" and stop["message"] == "stopped"


def wait_for_lines(server: Server, pattern: str, count: int, timeout_s: float = 10.0) -> None:
    """Wait until `count` stderr lines match `pattern`."""
    wait_for(
        lambda: len(re.findall(pattern, server.stderr)) >= count,
        timeout_s,
        lambda: f"{count} lines like {pattern!r}: {server.stderr[-2000:]}",
    )


def unix_client(path: str, data: bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(data)
    assert recv_exactly(sock, len(data)) == data
    return sock


@pytest.mark.parametrize("mode", ["threads", "pool", "asyncio", "workers"])
def test_unix_clients_are_told_apart_in_the_log(mode: str, unix_path: str) -> None:
    with Server("--unix", unix_path, "--host", "127.0.0.1", "--workers", "1", mode=mode) as server:
        with unix_client(unix_path, b"one") as first, unix_client(unix_path, b"three") as second:
            wait_for_lines(server, r"open unix#\d+\n", 2)
            second.close()  # the other way round from how they came
            first.close()
        wait_for_lines(server, r"close unix#\d+ ", 2)
        assert server.stop() == 0
    opened = re.findall(r"open (unix#\d+)\n", server.stderr)
    closed = dict(re.findall(r"close (unix#\d+) in=(\d+) ", server.stderr))
    assert len(set(opened)) == 2 and set(opened) == set(closed)
    assert sorted(closed.values()) == ["3", "5"]


def test_json_lines_number_each_connection(unix_path: str) -> None:
    with Server(
        "--log-format", "json", "--unix", unix_path, "--host", "127.0.0.1", mode="asyncio"
    ) as server:
        unix_client(unix_path, b"unix").close()
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"tcp")
            assert recv_exactly(sock, 3) == b"tcp"
            host, port = sock.getsockname()[:2]
        wait_for_lines(server, r'"event": "close"', 2)
        assert server.stop() == 0
    entries = [json.loads(line) for line in server.stderr.splitlines()]
    opens = [e for e in entries if e.get("event") == "open"]
    closes = [e for e in entries if e.get("event") == "close"]
    assert [e["peer"] for e in opens] == [f"unix#{opens[0]['conn_id']}", f"{host}:{port}"]
    assert [(e["peer"], e["conn_id"]) for e in closes] == [(e["peer"], e["conn_id"]) for e in opens]
    assert opens[0]["conn_id"] != opens[1]["conn_id"]
