"""A stop signal stops the server whichever of its threads the kernel hands it to.

SIGTERM and SIGINT are process-directed: the kernel may deliver them to any thread
that does not block them, while CPython runs the handler only in the main thread.
Each test aims the signal (tgkill) at a thread other than the main one while a
client holds a connection open, and requires the documented drain and exit 0.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .procs import ROOT, Process, Server
from .test_contract import recv_exactly, recv_until_eof

DRAIN_S = 1.0
# The bound: the drain timeout plus one second from the signal to the exit.
EXIT_WITHIN_S = DRAIN_S + 1.0
MODES = ["simple", "threads", "pool", "asyncio", "workers"]
# A metrics endpoint gives every model a thread besides the main one (simple and
# asyncio have no other); in threads and pool the newest thread serves the client.
WITH_A_SECOND_THREAD = ("--metrics-port", "0", "--drain-timeout", str(DRAIN_S))

pytestmark = pytest.mark.timeout(60)


def other_threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]


def blocked_signals(pid: int, tid: int) -> set[signal.Signals]:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M)[1], 16)  # type: ignore[index]
    return {sig for sig in signal.Signals if mask >> (sig - 1) & 1}


def hold_a_connection(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=10)
    sock.sendall(b"held")
    assert recv_exactly(sock, 4) == b"held"
    return sock


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_on_another_thread_drains_and_exits_zero(
    mode: str, sig: signal.Signals
) -> None:
    with Server(*WITH_A_SECOND_THREAD, "--workers", "1", mode=mode) as server:
        with hold_a_connection(server.address) as sock:
            server.signal_other_thread(sig)
            server.wait_for_stderr("stopping", timeout_s=EXIT_WITHIN_S)
            # The held connection is cut off at the drain deadline, not left hanging.
            assert recv_until_eof(sock) == b""
        assert server.wait(timeout_s=EXIT_WITHIN_S) == 0
        assert "outcome=drained" in server.stderr
        assert "Traceback" not in server.stderr


@pytest.mark.parametrize("mode", ["threads", "pool", "asyncio"])
def test_a_second_signal_on_another_thread_skips_the_drain(mode: str) -> None:
    with Server("--metrics-port", "0", "--drain-timeout", "60", mode=mode) as server:
        with hold_a_connection(server.address) as sock:
            server.signal_other_thread(signal.SIGTERM)
            server.wait_for_stderr("stopping", timeout_s=EXIT_WITHIN_S)
            server.signal_other_thread(signal.SIGTERM)
            assert recv_until_eof(sock) == b""
        assert server.wait(timeout_s=EXIT_WITHIN_S) == 0


def test_the_udp_service_stops_on_a_signal_to_its_thread() -> None:
    # Beside TCP, UDP runs in a thread of its own: the newest thread is likely its.
    with Server("--udp", "--tcp", "--drain-timeout", str(DRAIN_S), mode="threads") as server:
        server.wait_for_stderr("udp")
        with hold_a_connection(server.address):
            server.signal_other_thread(signal.SIGTERM)
            assert server.wait(timeout_s=EXIT_WITHIN_S) == 0
        assert "Traceback" not in server.stderr


@pytest.mark.parametrize("mode", ["threads", "simple"])
def test_the_tutorial_server_stops_on_ctrl_c_at_another_thread_with_nc_connected(
    mode: str,
) -> None:
    server = Process([sys.executable, "ServerPython.py", "--port", "0", "--mode", mode])
    with server:
        port = int(re.findall(r"port (\d+)", server.next_line())[0])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"Hello\n")
            assert recv_exactly(sock, 6) == b"Hello\n"
            if mode == "simple":
                # One thread only: the process-directed signal is the main thread's.
                server.signal(signal.SIGINT)
            else:
                server.signal_other_thread(signal.SIGINT)
            # The tutorial gives open connections one second.
            assert server.wait(timeout_s=2.0) == 0
        assert server.stderr == ""


def test_the_interactive_client_stops_on_a_signal_to_its_stdin_thread() -> None:
    with Server(mode="threads") as server:
        client = Process(
            [sys.executable, "-m", "echoplex", "client", "--port", str(server.port)],
            stdin=subprocess.PIPE,
            cwd=ROOT,
        )
        with client:
            assert client.proc.stdin is not None
            client.proc.stdin.write(b"hi\n")
            client.proc.stdin.flush()
            assert client.next_line() == "hi\n"
            # Its main thread blocks in recv, which no signal on another thread wakes: so
            # the stdin thread blocks the stop signals, and the kernel, which hands a
            # process-directed signal only to a thread that does not block it, picks main.
            for tid in other_threads(client.proc.pid):
                assert blocked_signals(client.proc.pid, tid) >= {signal.SIGINT, signal.SIGTERM}
            client.signal(signal.SIGINT)
            assert client.wait(timeout_s=5) == 0
            assert "Traceback" not in client.stderr
