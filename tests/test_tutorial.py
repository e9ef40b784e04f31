"""The tutorial's walkthrough, replayed with the real `nc` and the two front-door scripts."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from .kernel import asleep, unread_from_process
from .procs import ROOT, Process, require_tool
from .waiting import wait_for

STARTING = re.compile(r"^Starting server on 'localhost' port (\d+)\n$")
MESSAGE = b"Hello, world"  # the client's default
NEW_CONNECTION = re.compile(r"^Received new connection from  \('127\.0\.0\.1', \d+\)\n$")


def start_tutorial_server(*args: str) -> tuple[Process, int]:
    server = Process([sys.executable, "ServerPython.py", "--port", "0", *args])
    match = STARTING.match(server.next_line())
    assert match, server.stdout
    return server, int(match.group(1))


def run_client(port: int, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "ClientPython.py", "--port", str(port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def start_client(port: int) -> subprocess.Popen[str]:
    """The tutorial's client, left running: for a server that may make it wait."""
    return subprocess.Popen(
        [sys.executable, "ClientPython.py", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_nc(port: int) -> Process:
    return Process([require_tool("nc"), "127.0.0.1", str(port)], stdin=subprocess.PIPE)


def type_into(nc: Process, text: str) -> None:
    assert nc.proc.stdin is not None
    nc.proc.stdin.write(text.encode())
    nc.proc.stdin.flush()


def nc_says_hello(server: Process, port: int) -> Process:
    """The tutorial's first steps: nc connects, types Hello, and both sides show it."""
    nc = start_nc(port)
    assert NEW_CONNECTION.match(server.next_line())
    type_into(nc, "Hello\n")
    assert server.next_line() == "Received: b'Hello\\n'\n"
    assert nc.next_line() == "Hello\n"
    return nc


def test_default_port_and_host_are_the_tutorials() -> None:
    # Parse --help rather than bind 12345, which another program may hold.
    out = subprocess.run(
        [sys.executable, "ServerPython.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    assert "default localhost" in out and "default 12345" in out


def test_threads_walkthrough_with_nc() -> None:
    server, port = start_tutorial_server()
    with server:
        with nc_says_hello(server, port) as nc:
            # While nc stays connected, the tutorial's client is served at once.
            client = run_client(port)
            assert client.returncode == 0, client.stderr
            assert client.stdout == "Starting client...\nReceived: b'Hello, world'\n"
            assert NEW_CONNECTION.match(server.next_line())
            assert server.next_line() == "Received: b'Hello, world'\n"

            # nc was connected the whole time.
            type_into(nc, "Still here!\n")
            assert server.next_line() == "Received: b'Still here!\\n'\n"
            assert nc.next_line() == "Still here!\n"
        server.signal(signal.SIGINT)
        assert server.wait() == 0
        assert "Traceback" not in server.stderr


def test_simple_mode_makes_the_second_client_wait() -> None:
    server, port = start_tutorial_server("--mode", "simple")
    with server:
        with nc_says_hello(server, port):  # nc stays connected, idle
            client = start_client(port)
            try:
                # The client connects (into the backlog) but gets no echo while nc holds the server.
                with pytest.raises(subprocess.TimeoutExpired):
                    client.wait(timeout=1.0)
                assert server.stdout_lines.empty()
            except BaseException:
                client.kill()
                client.communicate()
                raise
        # nc quits: now the waiting client is served.
        out, err = client.communicate(timeout=20)
        assert client.returncode == 0, err
        assert out == "Starting client...\nReceived: b'Hello, world'\n"
        assert NEW_CONNECTION.match(server.next_line())
        assert server.next_line() == "Received: b'Hello, world'\n"
        server.signal(signal.SIGTERM)
        assert server.wait() == 0


def test_nc_dash_n_quits_on_end_of_input_and_the_waiting_client_is_served() -> None:
    # The README's way to end nc with Ctrl-D: `nc -N` shuts its side down at end of input.
    server, port = start_tutorial_server("--mode", "simple")
    with server:
        nc = Process([require_tool("nc"), "-N", "127.0.0.1", str(port)], stdin=subprocess.PIPE)
        with nc:
            assert NEW_CONNECTION.match(server.next_line())
            type_into(nc, "Hello\n")
            assert server.next_line() == "Received: b'Hello\\n'\n"
            assert nc.next_line() == "Hello\n"
            client = start_client(port)
            try:
                assert nc.proc.stdin is not None
                nc.proc.stdin.close()  # Ctrl-D
                assert nc.wait() == 0
                out, err = client.communicate(timeout=20)
            finally:
                client.kill()
                client.communicate()
        assert client.returncode == 0, err
        assert out == "Starting client...\nReceived: b'Hello, world'\n"
        server.signal(signal.SIGTERM)
        assert server.wait() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_server_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    server, _ = start_tutorial_server()
    with server:
        server.signal(sig)
        assert server.wait() == 0
        assert server.stderr == ""


def test_client_reports_a_refused_connection_in_one_line() -> None:
    server, port = start_tutorial_server()
    with server:
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
    result = run_client(port)
    assert result.returncode == 1
    assert result.stdout == "Starting client...\n"
    assert result.stderr.count("\n") == 1 and "cannot connect" in result.stderr


def test_client_stops_cleanly_on_sigint_while_waiting() -> None:
    server, port = start_tutorial_server("--mode", "simple")
    with server:
        nc = start_nc(port)
        with nc:
            assert NEW_CONNECTION.match(server.next_line())
            client = Process([sys.executable, "ClientPython.py", "--port", str(port)])
            with client:
                assert client.next_line() == "Starting client...\n"
                # Its message waits in the busy server's queue and it sleeps: blocked in
                # recv, where the signal must still end it cleanly.
                wait_for(
                    lambda: (
                        unread_from_process(client.proc.pid) == len(MESSAGE)
                        and asleep(client.proc.pid)
                    ),
                    10,
                    "the client blocked waiting for its echo",
                )
                client.signal(signal.SIGINT)
                assert client.wait() == 0
                assert "Traceback" not in client.stderr
