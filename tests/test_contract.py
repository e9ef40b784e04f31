"""The contract as only a process shows it, against every model through `echoplex serve`:
its log lines on stderr, signals from outside, and the exit status. The rest of the
contract (echo, half-close, resets, limits, TLS, PROXY, the drain) is checked in-process
by the conformance kit, `echoplex.testing.check_model` (`tests/test_conformance.py`).
"""

from __future__ import annotations

import re
import signal
import socket

import pytest

from echoplex.testing import echo_concurrently, recv_exactly, recv_until_eof

from .procs import Server


def drive_clients(
    address: tuple[str, int], payloads: list[list[bytes]], timeout_s: float
) -> list[bytes]:
    """For `tests/test_pool.py`: the kit's concurrent clients, one per payload."""
    socks = [socket.create_connection(address, timeout=timeout_s) for _ in payloads]
    try:
        return echo_concurrently(
            socks, [b"".join(chunks) for chunks in payloads], timeout_s=timeout_s
        )
    finally:
        for sock in socks:
            sock.close()


def test_logs_one_line_per_connection_opened_and_closed(server: Server) -> None:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"hello\x00\xff")
        assert recv_exactly(sock, 7) == b"hello\x00\xff"
        host, port = sock.getsockname()[:2]
        peer = f"{host}:{port}"
    match = server.wait_for_stderr(
        rf"close {re.escape(peer)} in=7 out=7 duration=[\d.]+s outcome=closed"
    )
    assert match
    assert f"open {peer}" in server.stderr
    assert "Received:" not in server.stderr  # per-chunk lines only with --log-data
    assert server.stop() == 0
    assert "Traceback" not in server.stderr


def test_log_data_prints_the_tutorial_lines(mode: str) -> None:
    with Server("--log-data", "--workers", "1", mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"Hello\n")
            assert recv_exactly(sock, 6) == b"Hello\n"
        server.wait_for_stderr(re.escape("Received: b'Hello\\n'"))
        assert server.stop() == 0


def test_sigterm_drains_open_connections_then_exits_zero(server: Server) -> None:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"one")
        assert recv_exactly(sock, 3) == b"one"
        server.signal(signal.SIGTERM)
        server.wait_for_stderr("stopping")
        # Stop accepting: the listener is closed.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(server.address, timeout=5).close()
        # The open connection still echoes during the drain, and ends when the client does.
        sock.sendall(b"two")
        assert recv_exactly(sock, 3) == b"two"
    assert server.wait() == 0
    assert "Traceback" not in server.stderr


def test_drain_timeout_closes_idle_connections(mode: str) -> None:
    with Server("--drain-timeout", "0.3", "--workers", "1", mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"idle")
            assert recv_exactly(sock, 4) == b"idle"
            server.signal(signal.SIGTERM)
            # The server closes us once the drain timeout passes.
            assert recv_until_eof(sock) == b""
        assert server.wait() == 0
        assert "outcome=drained" in server.stderr


def test_second_signal_skips_the_drain(mode: str) -> None:
    with Server("--drain-timeout", "60", "--workers", "1", mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"idle")
            assert recv_exactly(sock, 4) == b"idle"
            server.signal(signal.SIGINT)
            server.wait_for_stderr("stopping")
            server.signal(signal.SIGINT)
            assert recv_until_eof(sock) == b""
        assert server.wait(timeout_s=20) == 0
