"""The echo contract, checked against every concurrency model with real sockets."""

from __future__ import annotations

import random
import re
import selectors
import signal
import socket
import struct
import threading
import time

import pytest

from echoplex.testing import recv_exactly, recv_until_eof

from .procs import Server

CLOSE_LINE = re.compile(r"close (\S+) in=(\d+) out=(\d+) duration=([\d.]+)s outcome=(\S+)")


def drive_clients(
    address: tuple[str, int], payloads: list[list[bytes]], timeout_s: float
) -> list[bytes]:
    """Connect one client per payload, send its chunks while reading, half-close, read to EOF.

    Single-threaded with a selector so all clients are truly simultaneous.
    """
    deadline = time.monotonic() + timeout_s
    socks = [socket.create_connection(address, timeout=timeout_s) for _ in payloads]
    received = [bytearray() for _ in payloads]
    pending = [list(chunks) for chunks in payloads]
    try:
        with selectors.DefaultSelector() as selector:
            for index, sock in enumerate(socks):
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, index)
            open_count = len(socks)
            while open_count:
                assert time.monotonic() < deadline, "clients did not finish in time"
                for key, mask in selector.select(timeout=0.5):
                    index, sock = key.data, socks[key.data]
                    if mask & selectors.EVENT_WRITE:
                        if pending[index]:
                            chunk = pending[index][0]
                            try:
                                sent = sock.send(chunk)
                            except BlockingIOError:
                                sent = 0
                            pending[index][0] = chunk[sent:]
                            if not pending[index][0]:
                                pending[index].pop(0)
                        if not pending[index]:
                            sock.shutdown(socket.SHUT_WR)
                            selector.modify(sock, selectors.EVENT_READ, index)
                    if mask & selectors.EVENT_READ:
                        try:
                            chunk = sock.recv(65536)
                        except BlockingIOError:
                            continue
                        if chunk:
                            received[index] += chunk
                        else:
                            selector.unregister(sock)
                            open_count -= 1
    finally:
        for sock in socks:
            sock.close()
    return [bytes(data) for data in received]


def random_chunks(rng: random.Random, total: int) -> list[bytes]:
    data = rng.randbytes(total)
    chunks, offset = [], 0
    while offset < total:
        size = rng.choice([1, 2, 7, 100, 1000, 4096, 20000])
        chunks.append(data[offset : offset + size])
        offset += size
    return chunks


def test_fifty_concurrent_clients_get_exactly_their_bytes(server: Server) -> None:
    rng = random.Random(1234)
    payloads = [random_chunks(rng, rng.randint(1, 40_000)) for _ in range(50)]
    payloads[0] = [b"\x00\xff\x00\r\n\x1b" * 100]  # NUL, 0xFF and control bytes
    echoed = drive_clients(server.address, payloads, timeout_s=30)
    for index, (sent, got) in enumerate(zip(payloads, echoed, strict=True)):
        assert got == b"".join(sent), f"client {index}"
    assert server.stop() == 0
    assert "Traceback" not in server.stderr


def test_one_mebibyte_sent_and_read_at_once(server: Server) -> None:
    data = random.Random(7).randbytes(1 << 20)
    with socket.create_connection(server.address, timeout=20) as sock:
        received: list[bytes] = []
        reader = threading.Thread(target=lambda: received.append(recv_exactly(sock, len(data))))
        reader.start()
        sock.sendall(data)
        reader.join(timeout=30)
        assert not reader.is_alive()
    assert received == [data]


def test_half_close_gets_every_byte_back(server: Server) -> None:
    data = random.Random(3).randbytes(200_000)
    with socket.create_connection(server.address, timeout=20) as sock:

        def send_then_half_close() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send_then_half_close)
        sender.start()
        echoed = recv_until_eof(sock)
        sender.join(timeout=20)
    assert echoed == data


def test_a_reset_costs_that_connection_alone(server: Server) -> None:
    with socket.create_connection(server.address, timeout=10) as survivor:
        survivor.sendall(b"before")
        assert recv_exactly(survivor, 6) == b"before"
        for _ in range(5):
            victim = socket.create_connection(server.address, timeout=10)
            victim.sendall(b"x" * 100_000)  # leave echoes unread, then reset
            victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            victim.close()
        survivor.sendall(b"after")
        assert recv_exactly(survivor, 5) == b"after"
    with socket.create_connection(server.address, timeout=10) as newcomer:
        newcomer.sendall(b"new")
        assert recv_exactly(newcomer, 3) == b"new"
    assert server.stop() == 0
    assert "Traceback" not in server.stderr


def test_logs_one_line_per_connection_opened_and_closed(server: Server) -> None:
    with socket.create_connection(server.address, timeout=10) as sock:
        sock.sendall(b"hello")
        assert recv_exactly(sock, 5) == b"hello"
        host, port = sock.getsockname()[:2]
        peer = f"{host}:{port}"
    match = server.wait_for_stderr(
        rf"close {re.escape(peer)} in=5 out=5 duration=[\d.]+s outcome=closed"
    )
    assert match
    assert f"open {peer}" in server.stderr
    assert "Received:" not in server.stderr  # per-chunk lines only with --log-data
    server.stop()


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
