"""`pool` serves any number of connections with its fixed threads: an idle, stalled or
non-reading client never holds a worker, so nobody waits behind it."""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import random
import select
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from echoplex import LogEvents, ServerConfig, Shutdown, run
from echoplex.conditions import Work
from echoplex.models import pool
from echoplex.proxy_protocol import encode_v1

from .kernel import read_by_peer, unread_by_peer
from .procs import Server
from .test_contract import drive_clients, recv_exactly
from .waiting import wait_for

THREADS = 4
MAX_BUFFER = 64 << 10
# Far more than its buffer and both kernels' socket buffers (a few MB on loopback) hold.
PUSH_LIMIT_BYTES = 256 << 20
pytestmark = pytest.mark.timeout(90)


def held(server: Server, count: int) -> list[socket.socket]:
    return [socket.create_connection(server.address, timeout=10) for _ in range(count)]


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_forty_idle_clients_do_not_stop_the_forty_first() -> None:
    with Server("--threads", str(THREADS), mode="pool") as server:
        idle = held(server, 40)
        try:
            for sock in idle[:: len(idle) // THREADS]:  # each has been served once, too
                sock.sendall(b"hi")
                assert recv_exactly(sock, 2) == b"hi"
            with socket.create_connection(server.address, timeout=10) as late:
                late.sendall(b"me too")
                assert recv_exactly(late, 6) == b"me too"
            # Threads stay what was asked: main, the workers, nothing per connection.
            assert thread_count(server.proc.pid) <= THREADS + 2
        finally:
            for sock in idle:
                sock.close()
        assert server.stop() == 0


def test_two_hundred_clients_at_once_on_two_threads_get_exactly_their_bytes() -> None:
    rng = random.Random(11)
    payloads = [
        [rng.randbytes(rng.randint(1, 9000)) for _ in range(rng.randint(1, 6))] for _ in range(200)
    ]
    with Server("--threads", "2", mode="pool") as server:
        got = drive_clients(server.address, payloads, timeout_s=60)
        assert got == [b"".join(chunks) for chunks in payloads]
        assert server.stop() == 0


def test_a_client_that_never_reads_holds_no_worker_and_is_not_read() -> None:
    with Server("--threads", "1", "--max-buffer", str(MAX_BUFFER), mode="pool") as server:
        with socket.create_connection(server.address, timeout=10) as hog:
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.setblocking(False)
            sent = 0

            def bytes_left_unread() -> bool:
                """Push until the kernel takes no more; then true if the server has left
                bytes unread (while it reads them all, the push goes on)."""
                nonlocal sent
                with contextlib.suppress(BlockingIOError):
                    while sent < PUSH_LIMIT_BYTES:
                        sent += hog.send(b"x" * 65536)
                    pytest.fail(f"the server read {sent} bytes from a client that never reads")
                return unread_by_peer(hog) > 0

            wait_for(bytes_left_unread, 20, lambda: f"bytes left unread ({sent} sent)")
            hog_port = hog.getsockname()[1]
            # The one worker is free: another client is served at once.
            with socket.create_connection(server.address, timeout=10) as other:
                other.sendall(b"ping")
                assert recv_exactly(other, 4) == b"ping"
        # The server's own count: it read no more than it echoed and one buffer owed.
        close = server.wait_for_stderr(rf"close 127\.0\.0\.1:{hog_port} in=(\d+) out=(\d+)")
        bytes_in, bytes_out = int(close.group(1)), int(close.group(2))
        assert 0 <= bytes_in - bytes_out <= MAX_BUFFER, close.group(0)
        assert server.stop() == 0


def test_stalled_tls_handshakes_hold_no_worker(certificate: tuple[str, str, str]) -> None:
    cert_file, key_file, ca_file = certificate
    tls_args = ("--tls-cert", cert_file, "--tls-key", key_file, "--threads", "2")
    with Server(*tls_args, "--tls-handshake-timeout", "30", mode="pool") as server:
        stalled = held(server, 6)  # TCP connected, no ClientHello
        try:
            context = ssl.create_default_context(cafile=ca_file)
            with socket.create_connection(server.address, timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"secret")
                    assert recv_exactly(tls, 6) == b"secret"
        finally:
            for sock in stalled:
                sock.close()
        assert server.stop() == 0


def test_stalled_proxy_headers_hold_no_worker_and_a_split_header_is_read() -> None:
    trust = ("--proxy-protocol", "--trusted-proxy", "127.0.0.0/8", "--threads", "2")
    with Server(*trust, mode="pool") as server:
        header = encode_v1(("203.0.113.9", 4000), ("127.0.0.1", server.port))
        stalled = held(server, 4)
        try:
            for sock in stalled:
                sock.sendall(header[:7])  # half a header, then nothing
            with socket.create_connection(server.address, timeout=10) as proxied:
                proxied.sendall(header[:10])
                # A second segment, sent once the server has the first and waits for more.
                wait_for(lambda: read_by_peer(proxied), 10, "the first part read")
                proxied.sendall(header[10:] + b"data")
                assert recv_exactly(proxied, 4) == b"data"
            server.wait_for_stderr(r"close 203\.0\.113\.9:4000 in=4 out=4")
        finally:
            for sock in stalled:
                sock.close()
        assert server.stop() == 0


def reset_at_once(server: Server) -> None:
    """Connect and reset (SO_LINGER 0), as port scanners and TCP health checks do."""
    sock = socket.create_connection(server.address, timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("mode", ["pool", "threads"])
def test_clients_that_reset_before_the_tls_handshake_cost_only_themselves(
    mode: str, certificate: tuple[str, str, str]
) -> None:
    cert_file, key_file, ca_file = certificate
    tls_args = ("--tls-cert", cert_file, "--tls-key", key_file, "--threads", "2")
    with Server(*tls_args, "--drain-timeout", "30", mode=mode) as server:
        for _ in range(6):  # three times the pool's workers
            reset_at_once(server)
        wait_for(
            lambda: server.stderr.count("outcome=tls-handshake-failed") >= 6,
            10,
            lambda: f"six failed handshakes: {server.stderr[-2000:]}",
        )
        context = ssl.create_default_context(cafile=ca_file)
        with socket.create_connection(server.address, timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"still here")
                assert recv_exactly(tls, 10) == b"still here"
        # Nothing left open: the stop does not wait out the 30 s drain.
        assert server.stop(timeout_s=15) == 0
        assert "Traceback" not in server.stderr


class GatedPool(pool.ConnectionPool):
    """The pool, its workers' waits held at a gate the test opens one wait at a time,
    and what each wait returned counted: which turns one wakeup gave is then known."""

    def __init__(self, *args: Any) -> None:
        self.parked: queue.SimpleQueue[str] = queue.SimpleQueue()  # a worker at the gate
        self.let_through = threading.Semaphore(0)
        self.open = False
        self.batches: list[list[int]] = []  # the descriptors each wait returned, in order
        super().__init__(*args)  # starts the workers

    def _ready_events(self) -> list[tuple[int, int]]:
        if not self.open:
            self.parked.put(threading.current_thread().name)
            self.let_through.acquire()
        ready = super()._ready_events()
        self.batches.append([fd for fd, _ in ready])
        return ready

    def open_gate(self) -> None:
        """Let every wait through from now on (before the drain: it needs the workers)."""
        if not self.open:
            self.open = True
            for _ in self._threads:
                self.let_through.release()

    def close(self) -> None:
        self.open_gate()  # the workers must reach the stop
        super().close()

    @property
    def woken(self) -> collections.deque[pool.PooledConnection]:
        """The connections the timekeeper woke, that no worker has taken yet."""
        return self._woken

    def wait_until_parked(self, workers: int) -> None:
        for _ in range(workers):
            self.parked.get(timeout=10)

    def ready_on_the_server(self, count: int) -> bool:
        """True once `count` connections have bytes the server has not read: readable,
        as the kernel's next wait will find them (poll(2) takes nothing from epoll)."""
        poller = select.poll()
        for fd in list(self.by_fd):
            poller.register(fd, select.POLLIN)
        return len(poller.poll(0)) == count


@contextlib.contextmanager
def gated_pool(
    monkeypatch: pytest.MonkeyPatch, threads: int, **settings: Any
) -> Iterator[tuple[tuple[str, int], GatedPool]]:
    """A pool server in this process whose workers wait at a gate (GatedPool)."""
    made: list[GatedPool] = []

    def make(*args: Any) -> GatedPool:
        made.append(GatedPool(*args))
        return made[-1]

    monkeypatch.setattr(pool, "ConnectionPool", make)
    listening: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()

    class Ready(LogEvents):
        def listening(self, addresses: list[tuple[str, int]]) -> None:
            listening.put(addresses[0][:2])

    config = replace(ServerConfig(), mode="pool", port=0, threads=threads, **settings)
    shutdown = Shutdown()
    thread = threading.Thread(target=run, args=(config, Ready(), shutdown))
    thread.start()
    try:
        address = listening.get(timeout=10)
        yield address, made[0]
    finally:
        if made:
            made[0].open_gate()
        shutdown.request()
        thread.join(timeout=15)
        shutdown.close()
        assert not thread.is_alive()


def test_one_wakeup_serves_every_connection_that_is_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with gated_pool(monkeypatch, threads=1, drain_timeout_s=1) as (address, gate):
        clients = [socket.create_connection(address, timeout=10) for _ in range(8)]
        try:
            gate.wait_until_parked(1)
            wait_for(lambda: len(gate.by_fd) == 8, 10, "eight connections in the pool")
            for sock in clients:
                sock.sendall(b"x")
            wait_for(lambda: gate.ready_on_the_server(8), 10, "eight readable connections")
            gate.let_through.release()  # one wait
            gate.wait_until_parked(1)  # at the next: all it served, that one wait gave it
            assert len(gate.batches) == 1
            assert sorted(gate.batches[0]) == sorted(gate.by_fd)
            for sock in clients:
                assert recv_exactly(sock, 1) == b"x"
        finally:
            for sock in clients:
                sock.close()


def test_a_turn_that_blocks_on_work_hands_the_rest_of_its_batch_to_a_free_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    working, done = threading.Event(), threading.Event()

    def work_that_holds_the_first(work: Work, *args: object) -> None:
        """The first chunk's work lasts until the test ends it; the others' none."""
        if not working.is_set():
            working.set()
            assert done.wait(30)

    monkeypatch.setattr(pool, "work_on", work_that_holds_the_first)
    settings = {"work": Work("io", 1.0), "drain_timeout_s": 1}
    with gated_pool(monkeypatch, threads=2, **settings) as (address, gate):
        clients = [socket.create_connection(address, timeout=10) for _ in range(2)]
        try:
            gate.wait_until_parked(2)
            wait_for(lambda: len(gate.by_fd) == 2, 10, "two connections in the pool")
            # Work opens each with a wake of the timekeeper (its first actions may be due
            # at once): served first, one wait each, so that no wake can stand in for the
            # hand-back below.
            wait_for(lambda: len(gate.woken) == 2, 10, "the two wakes of their opening")
            for _ in range(2):
                gate.let_through.release()
                gate.wait_until_parked(1)
            assert not gate.woken
            del gate.batches[:]
            for sock in clients:
                sock.sendall(b"x")
            wait_for(lambda: gate.ready_on_the_server(2), 10, "two readable connections")
            gate.let_through.release()  # one worker takes both, and works on the first
            assert working.wait(10)
            # Both in that one wait (and the timekeeper's wake: work opens them with one).
            assert len(gate.batches) == 1
            assert set(gate.by_fd) <= set(gate.batches[0])
            gate.let_through.release()  # the other worker: the second was handed back
            readable, _, _ = select.select(clients, [], [], 10)
            assert len(readable) == 1, "the second connection waited behind the first's work"
            assert recv_exactly(readable[0], 1) == b"x"
            done.set()
            for sock in clients:
                if sock is not readable[0]:
                    assert recv_exactly(sock, 1) == b"x"
        finally:
            done.set()
            for sock in clients:
                sock.close()
