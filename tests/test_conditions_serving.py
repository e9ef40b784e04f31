"""Conditions on purpose and handler work as a client sees them, in every model, over
TLS and Unix sockets as over TCP (the conformance kit checks each condition over TCP).

Time is only ever checked from below (an echo no sooner than the work allows): a busy
machine makes a server late, never early. What a model does *not* hold is shown by
what the server has read (its sockets' receive queues, through /proc/net/tcp) while
its echo waits far longer than the test.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path

import pytest

from echoplex.models import MODELS
from echoplex.testing import recv_exactly, unread_by_peer

from .procs import Process, Server
from .test_transports import start_unix_server
from .waiting import wait_for

pytestmark = pytest.mark.timeout(60)

ALL = list(MODELS)
WORK_S = 0.3


def until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """What comes back until the server ends the connection, and how it ended."""
    got = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except (ConnectionResetError, ssl.SSLEOFError):
        return bytes(got), "reset"
    return bytes(got), "eof"


@pytest.mark.parametrize("mode", ALL)
def test_over_tls_a_sliced_delayed_echo_closes_after_its_bytes_of_plaintext(
    mode: str, trusted_tls: dict[str, object]
) -> None:
    args = [*trusted_tls["args"], "--latency", "50ms", "--slice", "7", "--close-after", "20"]  # type: ignore[misc]
    with Server(*args, "--workers", "1", mode=mode) as server:
        context = trusted_tls["client"]
        assert isinstance(context, ssl.SSLContext)
        with socket.create_connection(server.address, timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                data = bytes(range(50))
                sock.sendall(data)
                got, _ = until_closed(sock)
        # The marks count plaintext: exactly 20 bytes, sliced and delayed, then the end.
        assert got == data[:20]
        server.wait_for_stderr(r"out=20 .*outcome=close-after conditions: latency=0\.05s slice=7")
        assert server.stop() == 0


@pytest.mark.parametrize("mode", ALL)
def test_over_a_unix_socket_conditions_apply_and_reset_after_ends_it(
    mode: str, tmp_path: Path
) -> None:
    path = str(tmp_path / "echo.sock")
    with start_unix_server(path, mode, "--latency", "20ms", "--reset-after", "5") as server:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"hello, world")
            got, _ = until_closed(sock)  # a Unix socket has no RST: it ends, however told
        assert got == b"hello"
        server.wait_for_stderr(r"close unix#\d+ in=12 out=5 .*outcome=reset-after")
        assert stop(server) == 0


def stop(server: Process) -> int:
    server.signal()
    return server.wait()


def clients(server: Server, count: int) -> list[socket.socket]:
    return [socket.create_connection(server.address, timeout=10) for _ in range(count)]


@pytest.mark.parametrize("mode", ["threads", "pool", "asyncio", "workers"])
def test_a_delayed_echo_holds_no_thread_nor_the_loop(mode: str) -> None:
    # The figure: 20 clients against 2 threads of a pool. With an echo delayed
    # an hour, the server has read every client's message: none of them holds a thread.
    args = ["--latency", "1h", "--threads", "2", "--workers", "1", "--drain-timeout", "0"]
    with Server(*args, mode=mode) as server, contextlib.ExitStack() as stack:
        socks = [stack.enter_context(sock) for sock in clients(server, 20)]
        for sock in socks:
            sock.sendall(b"ping")
        wait_for(
            lambda: all(unread_by_peer(sock) == 0 for sock in socks),
            20,
            lambda: f"{sum(unread_by_peer(s) > 0 for s in socks)} of 20 messages unread",
        )
        assert server.stop() == 0  # the drain cuts the held echoes off


@pytest.mark.parametrize("mode", ["threads", "asyncio", "workers"])
def test_io_work_holds_a_thread_per_connection_models_nothing_else(mode: str) -> None:
    # `threads` gives each connection a thread of its own to wait in; the event loops
    # wait on a timer: work that waits an hour, and every client's message is read.
    args = ["--work", "io:1h", "--workers", "1", "--drain-timeout", "0"]
    with Server(*args, mode=mode) as server, contextlib.ExitStack() as stack:
        socks = [stack.enter_context(sock) for sock in clients(server, 8)]
        for sock in socks:
            sock.sendall(b"ping")
        wait_for(lambda: all(unread_by_peer(sock) == 0 for sock in socks), 20, "all read")
        assert server.stop() == 0


def echo_all_at_once(server: Server, count: int) -> float:
    """Seconds from the first send until every one of `count` clients has its echo and
    the server's EOF (each closes once echoed, so `simple` takes the next)."""
    socks = clients(server, count)
    started = time.monotonic()
    try:
        for sock in socks:
            sock.sendall(b"ping")
        for sock in socks:
            assert recv_exactly(sock, 4) == b"ping"
            sock.shutdown(socket.SHUT_WR)
            assert not sock.recv(1)
    finally:
        for sock in socks:
            sock.close()
    return time.monotonic() - started


@pytest.mark.parametrize(
    ("mode", "args", "waves"),
    [
        ("simple", [], 4),  # one client at a time
        ("pool", ["--threads", "2"], 2),  # two at a time
    ],
)
def test_io_work_holds_the_threads_of_simple_and_pool(
    mode: str, args: list[str], waves: int
) -> None:
    with Server("--work", f"io:{WORK_S}s", *args, mode=mode) as server:
        took_s = echo_all_at_once(server, 4)
        assert took_s >= waves * WORK_S, f"4 clients served in {took_s:.3f} s"
        assert server.stop() == 0


@pytest.mark.parametrize("mode", ["threads", "pool", "asyncio"])
def test_cpu_work_is_serialized_by_the_gil_in_one_process(mode: str) -> None:
    # Two clients, each chunk 0.3 s of its thread's CPU time: one process computes one
    # at a time, however many threads it has, so both take about 0.6 s, where two cores
    # would take 0.3. Not exactly 0.6 from below: each thread's CPU clock also counts
    # the C code it runs while handing the GIL over, as the other already computes
    # (a CI run saw 0.59993 s), so the bound sits between the two shapes.
    with Server("--work", f"cpu:{WORK_S}s", mode=mode) as server:
        took_s = echo_all_at_once(server, 2)
        assert took_s >= 1.5 * WORK_S, f"2 clients' CPU work done in {took_s:.3f} s"
        assert server.stop() == 0


def test_cpu_work_in_workers_is_echoed_by_every_process() -> None:
    # What more than one core buys is a measurement (`echoplex lesson`), not a test:
    # here, that work done in two processes still echoes every byte.
    with Server("--work", "cpu:50ms", "--workers", "2", mode="workers") as server:
        echo_all_at_once(server, 4)
        assert server.stop() == 0


# A chunk under the handler's work is held by the server, as what conditions hold:
# not echo the client is slow to take. One rule in every model (`Connections.working`).


@pytest.mark.parametrize("mode", ALL)
def test_work_longer_than_the_send_timeout_is_no_send_timeout(mode: str) -> None:
    args = ["--work", "io:1s", "--send-timeout", "0.2", "--workers", "1"]
    with Server(*args, mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"ping")
            assert recv_exactly(sock, 4) == b"ping"  # after the work, not cut off during it
            sock.shutdown(socket.SHUT_WR)
            assert until_closed(sock) == (b"", "eof")
        server.wait_for_stderr(r"in=4 out=4 .*outcome=closed conditions: work=io:1s")
        assert server.stop() == 0


@pytest.mark.parametrize("mode", ALL)
def test_the_idle_limit_runs_while_the_handler_works(mode: str) -> None:
    # As under --latency: the idle limit counts from the last byte read, and ends the
    # connection with its chunk unechoed; an hour's io work does not keep it open.
    args = ["--work", "io:1h", "--idle-timeout", "0.3", "--workers", "1", "--drain-timeout", "0"]
    with Server(*args, mode=mode) as server:
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"ping")
            assert until_closed(sock) == (b"", "eof")
        server.wait_for_stderr(r"in=4 out=0 .*outcome=idle-timeout conditions: work=io:3600s")
        assert server.stop() == 0
