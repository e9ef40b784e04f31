"""The metrics port under abuse: silent, trickling and resetting clients.

The endpoint must stay bounded (threads, descriptors), drop a client that does not
finish its request in time, stay quiet about resets, and keep answering scrapes.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator

import pytest

from echoplex._http import MAX_HEAD_BYTES

from .procs import Server
from .test_metrics import METRICS_LINE, health, scrape, total
from .waiting import wait_for

ABUSERS = 300
DEADLINE_S = 30.0  # for the server to close a slow client: a bound, not a measurement


@pytest.fixture
def server() -> Iterator[Server]:
    with Server("--metrics-port", "0") as running:
        yield running


def metrics_address(server: Server) -> tuple[str, int]:
    match = server.wait_for_stderr(METRICS_LINE)
    return match.group(1), int(match.group(2))


def thread_count(server: Server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/task"))


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer sees a RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def assert_serving(server: Server) -> None:
    assert health(server) == 200
    assert total(scrape(server), "echoplex_connections_open") == 0


def test_scrapes_answer_while_300_clients_hold_half_a_request_line(server: Server) -> None:
    address = metrics_address(server)
    assert_serving(server)
    threads_before = thread_count(server)
    abusers: list[socket.socket] = []
    try:
        for _ in range(ABUSERS):
            sock = socket.create_connection(address, timeout=10)
            abusers.append(sock)
            sock.sendall(b"GET /metr")
        assert_serving(server)
        # No thread per connection: the endpoint's threads were all there before.
        assert thread_count(server) == threads_before
        assert_serving(server)
    finally:
        for sock in abusers:
            sock.close()
    assert server.stop() == 0
    assert "Traceback" not in server.stderr, server.stderr


def test_resets_mid_request_and_mid_answer_are_quiet(server: Server) -> None:
    address = metrics_address(server)
    assert_serving(server)
    for request in (b"GET /metrics HT", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"):
        for _ in range(20):
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(request)
            reset(sock)
    assert_serving(server)
    assert server.stop() == 0
    assert "Traceback" not in server.stderr, server.stderr


def test_a_trickling_client_is_closed_after_the_read_timeout(server: Server) -> None:
    """A byte at a time never completes the head: the server must close it anyway."""
    with socket.create_connection(metrics_address(server), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        sent = 0

        def closed_after_one_more_byte() -> bool:
            """Send a byte (each time wait_for asks), then true if the server has closed."""
            nonlocal sent
            try:
                sock.sendall(b"x")
                sent += 1
                readable, _, _ = select.select([sock], [], [], 0)
                return bool(readable) and sock.recv(1) == b""
            except (BrokenPipeError, ConnectionResetError):
                return True

        wait_for(closed_after_one_more_byte, DEADLINE_S, lambda: f"closed after {sent} bytes")
        # Closed for its time, not its size: the head never grew near the size limit.
        assert sent < MAX_HEAD_BYTES
    assert_serving(server)


def test_a_silent_client_is_closed_after_the_read_timeout(server: Server) -> None:
    with socket.create_connection(metrics_address(server), timeout=DEADLINE_S) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert sock.recv(1) == b""  # EOF: closed without an answer
    assert_serving(server)
