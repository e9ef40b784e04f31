"""The fault suite: hostile and broken clients against every model, with real sockets.

`workers` runs with one worker here; how its limits hold across workers is
`tests/test_workers_limits.py`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import signal
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from echoplex import ConnectionRecord, LogEvents, ServerConfig, Shutdown, run
from echoplex._accept import Acceptor
from echoplex.bench.proctree import tree_pids, tree_rss_bytes
from echoplex.limits import Admission

from .kernel import unread_by_peer
from .procs import LISTENING, Process, Server
from .test_contract import recv_exactly
from .waiting import wait_for

CONCURRENT = ["threads", "pool", "asyncio", "workers"]


def connect(server: Server, source_ip: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source_ip, 0))
    sock.connect(server.address)
    return sock


def echoes(sock: socket.socket, data: bytes = b"ping") -> bool:
    try:
        sock.sendall(data)
        return recv_exactly(sock, len(data)) == data
    except OSError:
        return False


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed this connection (EOF or reset), within the timeout."""
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def open_fds(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in tree_pids(pid))


@pytest.mark.parametrize("mode", CONCURRENT)
def test_max_connections_turns_away_the_extra_and_admits_when_a_slot_frees(mode: str) -> None:
    with Server("--max-connections", "2", "--workers", "1", mode=mode) as server:
        first, second = connect(server), connect(server)
        with first, second:
            assert echoes(first) and echoes(second)
            for _ in range(5):
                with connect(server) as extra:
                    assert closed_by_server(extra)
            assert echoes(first) and echoes(second)  # the admitted ones carry on
            server.wait_for_stderr(r"rejected 127\.0\.0\.1:\d+: over max-connections")
            first.close()

            def a_newcomer_is_admitted() -> bool:
                with connect(server) as newcomer:
                    return echoes(newcomer)

            wait_for(a_newcomer_is_admitted, 10, "a newcomer admitted once a slot is free")
        # Five rejections in well under a second: logged once, not five times.
        assert server.stderr.count("over max-connections") == 1
        assert server.stop() == 0


@pytest.mark.parametrize("mode", CONCURRENT)
def test_max_per_ip_limits_each_client_address(mode: str) -> None:
    with Server("--max-per-ip", "1", "--workers", "1", mode=mode) as server:
        with connect(server, "127.0.0.1") as first:
            assert echoes(first)
            with connect(server, "127.0.0.1") as same_ip:
                assert closed_by_server(same_ip)
            with connect(server, "127.0.0.2") as other_ip:
                assert echoes(other_ip)
        server.wait_for_stderr("over max-per-ip")


@pytest.mark.parametrize("mode", ["simple", *CONCURRENT])
def test_a_silent_client_loses_its_slot_after_the_idle_timeout(mode: str) -> None:
    with Server("--idle-timeout", "0.3", "--workers", "1", mode=mode) as server:
        with connect(server) as silent:
            assert echoes(silent)
            assert closed_by_server(silent)
        server.wait_for_stderr("outcome=idle-timeout")
        with connect(server) as next_client:
            assert echoes(next_client)


@pytest.mark.parametrize("mode", ["simple", *CONCURRENT])
def test_a_trickling_client_loses_its_slot_at_the_lifetime_limit(mode: str) -> None:
    with Server(
        "--idle-timeout", "0.4", "--max-lifetime", "1", "--workers", "1", mode=mode
    ) as server:
        with connect(server) as trickler:
            # A byte each time wait_for asks (every few ms, well inside the idle
            # timeout), until the server cuts the connection off.
            wait_for(lambda: not echoes(trickler, b"."), 10, "the trickler cut off")
        server.wait_for_stderr("outcome=max-lifetime")


@pytest.mark.parametrize("mode", ["simple", *CONCURRENT])
def test_a_client_that_never_reads_cannot_grow_server_memory(mode: str) -> None:
    with Server("--send-timeout", "1", "--workers", "1", mode=mode) as server:
        hog = connect(server)
        hog.setblocking(False)
        rss_before = tree_rss_bytes(server.proc.pid) or 0
        chunk = b"\xab" * (1 << 20)
        pushed = 0

        def bytes_left_unread() -> bool:
            """Push without reading until the kernel takes no more (up to 300 MB); then
            true if the server has left bytes unread (while it reads them all, the push
            goes on)."""
            nonlocal pushed
            try:
                while pushed < 300 << 20:
                    pushed += hog.send(chunk)
                return True  # the assertions below say what 300 MB taken means
            except BlockingIOError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                return True  # ended by its send timeout already
            return unread_by_peer(hog) > 0

        wait_for(bytes_left_unread, 10, lambda: f"bytes left unread ({pushed} pushed)")
        rss_after = tree_rss_bytes(server.proc.pid) or 0
        # Only socket buffers and one echo buffer hold the bytes: nowhere near 300 MB.
        assert pushed < 64 << 20
        assert rss_after - rss_before < 32 << 20
        if mode != "simple":  # simple serves the hog alone, by design
            with connect(server) as other:
                assert echoes(other, b"x" * 10_000)
        with hog:
            # The send timeout ends the hog: its connection is closed under it. Until
            # then the hog offers more, so that a server which has moved all it read into
            # its kernel's buffers (owing nothing it holds itself) reads and owes again.
            def timed_out() -> bool:
                with contextlib.suppress(BlockingIOError, ConnectionResetError, BrokenPipeError):
                    hog.send(chunk)
                return "outcome=send-timeout" in server.stderr

            wait_for(timed_out, 10, "outcome=send-timeout on the server's stderr")


@pytest.mark.parametrize("mode", ["simple", *CONCURRENT])
def test_half_closes_and_resets_under_load_leak_no_descriptor(mode: str) -> None:
    with Server("--max-connections", "40", "--workers", "1", mode=mode) as server:
        with connect(server) as warm_up:  # the event loops open a descriptor or two lazily
            assert echoes(warm_up)
        server.wait_for_stderr("close ", timeout_s=10)
        baseline = open_fds(server.proc.pid)
        errors: list[BaseException] = []

        def half_close(index: int) -> None:
            try:
                with connect(server) as sock:
                    data = bytes([index]) * 30_000
                    sock.sendall(data)
                    sock.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := sock.recv(65536):
                        got += chunk
                    # At the limit a client may be turned away (b""), never half-echoed.
                    assert got in (data, b"")
            except (ConnectionResetError, BrokenPipeError):
                pass
            except BaseException as exc:
                errors.append(exc)

        def reset(_: int) -> None:
            with contextlib.suppress(OSError), connect(server) as sock:
                sock.sendall(b"r" * 50_000)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        threads = [
            threading.Thread(target=(half_close if i % 2 else reset), args=(i,))
            for i in range(60 if mode != "simple" else 12)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert not errors, errors
        wait_for(
            lambda: open_fds(server.proc.pid) <= baseline,
            10,
            lambda: f"{baseline} descriptors as before, not {open_fds(server.proc.pid)}",
        )
        with connect(server) as sock:
            assert echoes(sock)
        assert server.stop() == 0
        assert "Traceback" not in server.stderr


def lowered_fd_limit(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@pytest.mark.parametrize("mode", CONCURRENT)
def test_out_of_descriptors_sheds_clients_without_spinning_then_recovers(mode: str) -> None:
    argv = [
        sys.executable,
        "-m",
        "echoplex",
        "serve",
        "--port",
        "0",
        "--mode",
        mode,
        "--workers",
        "1",
    ]
    with Process(argv, preexec_fn=lambda: lowered_fd_limit(48)) as server:
        match = server.wait_for_stderr(LISTENING)
        address = (match.group(1), int(match.group(2)))
        held: list[socket.socket] = []
        try:
            # Fill every descriptor the server has, and more.
            for _ in range(60):
                sock = socket.create_connection(address, timeout=10)
                held.append(sock)
            server.wait_for_stderr("out of file descriptors")
            # A client over the limit is closed at once, not left hanging.
            with socket.create_connection(address, timeout=10) as shed:
                shed.settimeout(10)
                assert closed_by_server(shed)
            lines = server.stderr.count("out of file descriptors")
        finally:
            for sock in held:
                sock.close()

        def serves_again() -> bool:
            try:
                with socket.create_connection(address, timeout=5) as sock:
                    sock.settimeout(5)
                    return echoes(sock)
            except OSError:
                return False

        wait_for(serves_again, 10, "a client served once descriptors are free")
        # Throttled (once a second), not once per client shed: of the 61 clients, those
        # beyond the 48 descriptors were shed, the last one only after all the others.
        assert 1 <= lines < 61 - 48
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
        assert "Traceback" not in server.stderr


class OutOfDescriptors:
    """A listener whose every accept() fails for lack of a descriptor, even the one the
    acceptor frees for it: the case where nothing at all can be taken off the queue."""

    def __init__(self) -> None:
        self.accepts = 0

    def accept(self) -> tuple[socket.socket, object]:
        self.accepts += 1
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_an_acceptor_that_can_take_nothing_backs_off_instead_of_retrying() -> None:
    # What keeps a server from spinning on a listener that stays readable: it is told
    # to back off, after one try with its spare descriptor, not to try again at once.
    acceptor = Acceptor(Admission(0, 0), LogEvents())
    listener = OutOfDescriptors()
    for _ in range(3):
        admitted, back_off = acceptor.accept_ready(listener)  # type: ignore[arg-type]
        assert (admitted, back_off) == ([], True)
    assert listener.accepts == 3 * 2  # each time: the accept, and the spare's


class ExplodingEvents(LogEvents):
    """Reporting that fails for one poisoned payload, as a bug in a handler would."""

    def data_received(self, record: ConnectionRecord, data: bytes) -> None:
        if b"poison" in data:
            raise RuntimeError("handler bug")


@contextlib.contextmanager
def in_process_server(mode: str, events: LogEvents) -> Iterator[tuple[str, int]]:
    ready = threading.Event()
    address: list[tuple[str, int]] = []

    class Ready(type(events)):  # type: ignore[misc]
        def listening(self, addresses: list[tuple[str, int]]) -> None:
            address.append(addresses[0])
            ready.set()

    shutdown = Shutdown()
    config = replace(ServerConfig(), mode=mode, port=0, log_data=True, drain_timeout_s=1)
    thread = threading.Thread(target=run, args=(config, Ready(), shutdown))
    thread.start()
    try:
        assert ready.wait(10)
        yield address[0][:2]
    finally:
        shutdown.request()
        thread.join(timeout=15)
        shutdown.close()
        assert not thread.is_alive()


@pytest.mark.parametrize("mode", ["simple", "threads", "pool", "asyncio"])
def test_a_failing_handler_costs_that_connection_alone(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    with in_process_server(mode, ExplodingEvents()) as address:
        with socket.create_connection(address, timeout=10) as bystander:
            if mode != "simple":
                bystander.sendall(b"fine")
                assert recv_exactly(bystander, 4) == b"fine"
            with socket.create_connection(address, timeout=10) as victim:
                if mode == "simple":
                    bystander.close()
                victim.sendall(b"poison")
                assert closed_by_server(victim)
            if mode != "simple":
                bystander.sendall(b"still fine")
                assert recv_exactly(bystander, 10) == b"still fine"
        with socket.create_connection(address, timeout=10) as newcomer:
            newcomer.sendall(b"hello")
            assert recv_exactly(newcomer, 5) == b"hello"
    tracebacks = [r for r in caplog.records if r.exc_info and "handler bug" in str(r.exc_info[1])]
    assert len(tracebacks) == 1


def test_a_connection_threads_cannot_start_a_thread_for_is_refused_and_others_served(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The system's thread limit cannot be reached for root (RLIMIT_NPROC does not hold
    # it), so the start of the next connection's thread fails as CPython says it does.
    refusals = [1]

    class Unstartable(threading.Thread):
        def start(self) -> None:
            target = getattr(self, "_target", None)
            if getattr(target, "__name__", "") == "serve" and refusals:
                refusals.pop()
                raise RuntimeError("can't start new thread")
            super().start()

    caplog.set_level(logging.INFO, logger="echoplex")
    with in_process_server("threads", LogEvents()) as address:
        monkeypatch.setattr(threading, "Thread", Unstartable)
        with socket.create_connection(address, timeout=10) as refused:
            assert closed_by_server(refused)
        with socket.create_connection(address, timeout=10) as served:
            served.sendall(b"hello")
            assert recv_exactly(served, 5) == b"hello"
    closes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("close ")]
    assert "outcome=rejected:no thread" in closes[0], closes


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-connections", "-1"], "must be 0 or more"),
        (["--idle-timeout", "-0.5"], "0 or more"),
        (["--max-buffer", "0"], "must be 1 byte"),
        (["--max-buffer", "lots"], "not a size in bytes"),
    ],
)
def test_bad_limits_are_one_line_and_exit_2(args: list[str], expected: str) -> None:
    from .procs import echoplex

    result = echoplex("serve", *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and expected in result.stderr


def test_no_worker_is_left_behind_after_sigterm() -> None:
    with Server("--workers", "2", mode="workers") as server:
        pids = tree_pids(server.proc.pid)
        assert len(pids) == 3
        assert server.stop() == 0
        assert not [
            pid
            for pid in pids
            if Path(f"/proc/{pid}").exists()
            and not re.search(r"\) [ZX] ", Path(f"/proc/{pid}/stat").read_text())
        ]
