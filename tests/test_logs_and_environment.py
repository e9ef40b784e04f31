"""`--log-format json` and options from ECHOPLEX_* environment variables."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from .procs import LISTENING, ROOT, Process, Server
from .test_cli_hostile import LONG_LABEL, LONG_UNIX_PATH, NOT_UTF8
from .test_contract import recv_exactly


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
