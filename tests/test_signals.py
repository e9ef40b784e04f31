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

import pytest

from .procs import ROOT, Process, Server
from .test_contract import recv_exactly, recv_until_eof

DRAIN_S = 1.0
MODES = ["simple", "threads", "pool", "asyncio", "workers"]
# A metrics endpoint gives every model a thread besides the main one (simple and
# asyncio have no other); in threads and pool the newest thread serves the client.
WITH_A_SECOND_THREAD = ("--metrics-port", "0", "--drain-timeout", str(DRAIN_S))

pytestmark = pytest.mark.timeout(60)


def other_threads(pid: int) -> list[int]:
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]


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
            server.wait_for_stderr("stopping")
            # The held connection is cut off at the drain deadline, not left hanging.
            assert recv_until_eof(sock) == b""
        assert server.wait() == 0
        assert "outcome=drained" in server.stderr
        assert "Traceback" not in server.stderr


@pytest.mark.parametrize("mode", ["threads", "pool", "asyncio"])
def test_a_second_signal_on_another_thread_skips_the_drain(mode: str) -> None:
    # A drain longer than the test may run: only the second signal can end it in time.
    with Server("--metrics-port", "0", "--drain-timeout", "600", mode=mode) as server:
        with hold_a_connection(server.address) as sock:
            server.signal_other_thread(signal.SIGTERM)
            server.wait_for_stderr("stopping")
            server.signal_other_thread(signal.SIGTERM)
            assert recv_until_eof(sock) == b""
        assert server.wait() == 0


def test_the_udp_service_stops_on_a_signal_to_its_thread() -> None:
    # Beside TCP, UDP runs in a thread of its own: the newest thread is likely its.
    with Server("--udp", "--tcp", "--drain-timeout", str(DRAIN_S), mode="threads") as server:
        server.wait_for_stderr("udp")
        with hold_a_connection(server.address):
            server.signal_other_thread(signal.SIGTERM)
            assert server.wait() == 0
        assert "outcome=drained" in server.stderr  # the drain did not wait on the client
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
            # The tutorial gives open connections a second, then closes them itself.
            assert recv_until_eof(sock) == b""
            assert server.wait() == 0
        assert server.stderr == ""


def test_the_interactive_client_stops_on_ctrl_c_while_it_waits(
    certificate: tuple[str, str, str],
) -> None:
    # One thread waits on stdin and the server alike (a TLS session may not be used
    # from two threads at once), so the signal always lands where it is acted on.
    cert_file, key_file, ca_file = certificate
    with Server("--tls-cert", cert_file, "--tls-key", key_file, mode="threads") as server:
        port = str(server.port)
        client = Process(
            [sys.executable, "-m", "echoplex", "client", "--tls", "--ca", ca_file, "--port", port],
            stdin=subprocess.PIPE,
            cwd=ROOT,
        )
        with client:
            assert client.proc.stdin is not None
            client.proc.stdin.write(b"hi\n")
            client.proc.stdin.flush()
            assert client.next_line() == "hi\n"
            assert other_threads(client.proc.pid) == []
            client.signal(signal.SIGINT)
            assert client.wait(timeout_s=5) == 0
            assert "Traceback" not in client.stderr


def test_ctrl_c_at_a_terminal_drains_workers_rather_than_cutting_them_off() -> None:
    # A terminal's Ctrl-C signals the whole process group: supervisor and workers.
    with Server("--workers", "2", "--drain-timeout", "30", mode="workers") as server:
        with hold_a_connection(server.address) as sock:
            os.killpg(server.proc.pid, signal.SIGINT)
            server.wait_for_stderr("stopping")
            # Still draining, not stopped at once: the held connection still echoes.
            sock.sendall(b"more")
            assert recv_exactly(sock, 4) == b"more"
        assert server.wait(timeout_s=15) == 0
        assert "outcome=drained" not in server.stderr
