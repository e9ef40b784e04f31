"""The zero-copy path for streaming clients: exact, automatic, and off where it must be."""

from __future__ import annotations

import os
import random
import socket
import threading

import pytest

from echoplex.models import _splice

from .procs import Server
from .test_contract import recv_exactly

pytestmark = pytest.mark.skipif(not _splice.AVAILABLE, reason="os.splice needs Linux")


def stream(server: Server, size: int, seed: int) -> None:
    data = random.Random(seed).randbytes(size)
    with socket.create_connection(server.address, timeout=20) as sock:
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(recv_exactly(sock, size)))
        reader.start()
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reader.join(timeout=30)
        assert sock.recv(1) == b""  # and then the server closes
    assert got == [data]


# Not `pool`: its turns may not block, and splice would need a pipe per connection.
@pytest.mark.parametrize("mode", ["simple", "threads"])
def test_a_streaming_client_is_echoed_exactly_by_splice(mode: str) -> None:
    with Server(mode=mode) as server:
        stream(server, 20 << 20, seed=1)
        server.wait_for_stderr(
            rf"in={20 << 20} out={20 << 20} duration=\S+ outcome=closed zero-copy"
        )
        # Small messages keep the ordinary path.
        with socket.create_connection(server.address, timeout=10) as sock:
            for _ in range(20):
                sock.sendall(b"ping")
                assert recv_exactly(sock, 4) == b"ping"
        server.wait_for_stderr(r"in=80 out=80 duration=\S+ outcome=closed\n")


def test_no_zero_copy_keeps_every_byte_in_python() -> None:
    with Server("--no-zero-copy", mode="threads") as server:
        stream(server, 5 << 20, seed=2)
        server.wait_for_stderr(rf"in={5 << 20} out={5 << 20} duration=\S+ outcome=closed\n")


def test_limits_still_apply_on_the_zero_copy_path() -> None:
    with Server("--idle-timeout", "0.3", "--send-timeout", "0.5", mode="threads") as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(os.urandom(256 << 10))  # streaming, then silent, never reading
            assert recv_exactly(sock, 64 << 10)  # at least one full buffer came back
            server.wait_for_stderr(r"outcome=(idle-timeout|send-timeout) zero-copy")


def test_drain_cuts_off_a_zero_copy_stream() -> None:
    with Server("--drain-timeout", "0.3", mode="threads") as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(os.urandom(128 << 10))
            assert recv_exactly(sock, 128 << 10)
            server.signal()
            assert sock.recv(1) == b""
        assert server.wait() == 0
        assert "outcome=drained zero-copy" in server.stderr
