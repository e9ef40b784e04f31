"""`--max-connections` and `--max-per-ip` bound the whole `workers` server, not each worker.

First the shared table's rules in one process (the workers' admissions side by side,
no sockets), then the server itself: real sockets, two worker processes behind one
`SO_REUSEPORT` port, a worker killed with SIGKILL.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from multiprocessing.synchronize import Event

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from echoplex._shared_admission import AdmissionTable, slots_for
from echoplex.limits import OVER_MAX_CONNECTIONS, OVER_MAX_PER_IP, Admission

from .procs import Server
from .test_hardening import closed_by_server, connect, echoes
from .test_metrics import scrape, total
from .waiting import wait_for


@contextmanager
def table(
    workers: int = 2, max_connections: int = 0, max_per_ip: int = 0, slots: int | None = None
) -> Iterator[AdmissionTable]:
    shared = AdmissionTable(
        workers,
        max_connections,
        max_per_ip,
        slots_for(max_connections, max_per_ip) if slots is None else slots,
    )
    try:
        yield shared
    finally:
        shared.close()


# The rules, in one process.


def test_workers_share_the_total() -> None:
    with table(max_connections=3) as shared:
        first, second = shared.admission_for(0), shared.admission_for(1)
        assert first.admit("10.0.0.1") is None
        assert first.admit("10.0.0.2") is None
        assert second.admit("10.0.0.3") is None
        assert second.admit("10.0.0.4") == OVER_MAX_CONNECTIONS
        assert first.admit("10.0.0.4") == OVER_MAX_CONNECTIONS
        first.release("10.0.0.1")
        assert second.admit("10.0.0.4") is None
        assert first.open == second.open == 3


def test_workers_share_each_address_count_whatever_its_spelling() -> None:
    with table(max_per_ip=2) as shared:
        first, second = shared.admission_for(0), shared.admission_for(1)
        assert first.admit("10.0.0.1") is None
        assert second.admit("::ffff:10.0.0.1") is None  # the same client, dual-stack
        assert first.admit("10.0.0.1") == OVER_MAX_PER_IP
        assert second.admit("10.0.0.1") == OVER_MAX_PER_IP
        assert second.admit("2001:db8::1") is None
        assert second.admit("2001:db8:0::1") is None
        assert first.admit("2001:db8::1") == OVER_MAX_PER_IP
        second.release("10.0.0.1")
        assert first.admit("10.0.0.1") is None


def test_a_proxied_client_is_counted_for_every_worker() -> None:
    with table(max_per_ip=1) as shared:
        first, second = shared.admission_for(0), shared.admission_for(1)
        assert first.admit("192.0.2.1", per_ip=False) is None  # the trusted proxy
        assert first.admit("192.0.2.1", per_ip=False) is None
        assert first.transfer("192.0.2.1", "203.0.113.9") is None  # its PROXY header
        assert second.admit("203.0.113.9") == OVER_MAX_PER_IP
        assert first.transfer("192.0.2.1", "203.0.113.9") == OVER_MAX_PER_IP
        first.release("203.0.113.9")
        assert second.admit("203.0.113.9") is None


def test_a_dead_workers_connections_are_given_back_total_and_per_address() -> None:
    with table(max_connections=4, max_per_ip=3) as shared:
        dead, alive = shared.admission_for(0), shared.admission_for(1)
        for _ in range(2):
            assert dead.admit("10.0.0.1") is None
        assert dead.admit("10.0.0.2") is None
        assert alive.admit("10.0.0.1") is None
        assert alive.admit("10.0.0.3") == OVER_MAX_CONNECTIONS
        shared.forget(0)
        assert alive.open == 1
        replacement = shared.admission_for(0)
        assert replacement.admit("10.0.0.1") is None
        assert alive.admit("10.0.0.1") is None
        assert alive.admit("10.0.0.1") == OVER_MAX_PER_IP
        assert replacement.admit("10.0.0.2") is None
        assert replacement.admit("10.0.0.3") == OVER_MAX_CONNECTIONS


def test_a_full_table_turns_a_new_address_away_and_takes_it_when_a_slot_frees() -> None:
    with table(workers=1, max_per_ip=5, slots=4) as shared:
        admission = shared.admission_for(0)
        for last_octet in range(1, 5):
            assert admission.admit(f"10.0.0.{last_octet}") is None
        assert admission.admit("10.0.0.5") == OVER_MAX_PER_IP  # no room to count it
        assert admission.admit("10.0.0.1") is None  # addresses already counted still are
        assert admission.open == 5
        admission.release("10.0.0.2")
        assert admission.admit("10.0.0.5") is None
        assert admission.admit("10.0.0.2") == OVER_MAX_PER_IP
        assert admission.open == 5


def test_without_a_per_address_limit_there_is_no_table() -> None:
    with table(max_connections=2) as shared:
        assert shared.slots == 0
        admission = shared.admission_for(1)
        assert admission.admit("10.0.0.1") is None
        assert admission.transfer("10.0.0.1", "10.0.0.2") is None
        assert admission.admit("10.0.0.1") is None
        assert admission.admit("10.0.0.1") == OVER_MAX_CONNECTIONS


ADDRESSES = ["10.0.0.1", "10.0.0.2", "::ffff:10.0.0.3", "2001:db8::7", "/tmp/echo.sock"]
OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["admit", "admit-proxied", "transfer", "release"]),
        st.integers(0, len(ADDRESSES) - 1),
        st.integers(0, 1),  # which worker
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(OPERATIONS)
def test_shared_counts_decide_as_one_process_would(operations: list[tuple[str, int, int]]) -> None:
    """The same `Admission` rules over the shared counts, spread over two workers, decide
    exactly as over one process's counts."""
    local = Admission(max_connections=6, max_per_ip=2)
    held: list[tuple[int, str]] = []
    with table(max_connections=6, max_per_ip=2) as shared:
        workers = [shared.admission_for(0), shared.admission_for(1)]
        for operation, address, worker in operations:
            ip = ADDRESSES[address]
            if operation.startswith("admit"):
                per_ip = operation == "admit"
                decided = workers[worker].admit(ip, per_ip=per_ip)
                assert decided == local.admit(ip, per_ip=per_ip)
                if decided is None:
                    held.append((worker, ip))
            elif held:
                owner, from_ip = held.pop(address % len(held))
                if operation == "release":
                    workers[owner].release(from_ip)
                    local.release(from_ip)
                    continue
                decided = workers[owner].transfer(from_ip, ip)
                assert decided == local.transfer(from_ip, ip)
                held.append((owner, ip if decided is None else from_ip))
            assert workers[0].open == local.open


def _admit_and_release(shared: AdmissionTable, worker: int, rounds: int) -> None:
    admission = shared.admission_for(worker)
    for _ in range(rounds):
        assert admission.admit("10.0.0.1") is None
        admission.release("10.0.0.1")


def test_concurrent_workers_lose_no_count() -> None:
    with table(max_connections=100, max_per_ip=100) as shared:
        context = multiprocessing.get_context("fork")
        workers = [
            context.Process(target=_admit_and_release, args=(shared, index, 3000))
            for index in range(2)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=30)
        assert [worker.exitcode for worker in workers] == [0, 0]
        assert shared.total() == 0 and shared.of("10.0.0.1") == 0


def _hold_the_lock(shared: AdmissionTable, holding: Event) -> None:
    with shared.locked():
        holding.set()
        signal.pause()


def test_a_worker_killed_inside_a_decision_does_not_leave_the_lock_held() -> None:
    with table(max_connections=10) as shared:
        context = multiprocessing.get_context("fork")
        holding = context.Event()
        worker = context.Process(target=_hold_the_lock, args=(shared, holding))
        worker.start()
        assert holding.wait(timeout=30)
        os.kill(worker.pid or 0, signal.SIGKILL)
        worker.join(timeout=30)
        shared.forget(0)  # as the supervisor does: takes the lock (the watchdog fails a hang)
        assert shared.admission_for(0).admit("10.0.0.1") is None


# The server: real sockets, real worker processes.


def served(sock: socket.socket) -> bool:
    """Echoes (True) or is closed by the server without an echo (False)."""
    if echoes(sock):
        return True
    assert closed_by_server(sock)
    return False


def log_name(sock: socket.socket) -> str:
    """How the server's log names this client: `IP:PORT`, as a pattern."""
    ip, port = sock.getsockname()
    return rf"{re.escape(ip)}:{port}\b"


def worker_of(server: Server, sock: socket.socket) -> str:
    """Which worker serves `sock` (`worker-N`), from its `open` log line."""
    return server.wait_for_stderr(rf"(worker-\d) echoplex\.server: open {log_name(sock)}").group(1)


def leave(server: Server, clients: list[socket.socket]) -> None:
    """Close `clients` and wait until the server has: it gives a slot back before it logs
    the close."""
    names = [log_name(client) for client in clients]
    for client in clients:
        client.close()
    for name in names:
        server.wait_for_stderr(rf"close {name}")


@pytest.mark.timeout(120)
def test_max_connections_bounds_all_workers_together() -> None:
    with Server("--workers", "2", "--max-connections", "50", mode="workers") as server:
        with ExitStack() as stack:
            clients = [stack.enter_context(connect(server)) for _ in range(150)]
            verdicts = [served(client) for client in clients]
            assert verdicts.count(True) == 50
            kept = [client for client, ok in zip(clients, verdicts, strict=True) if ok]
            # Both workers serve (the limit is shared, not one worker taking everything).
            assert {worker_of(server, client) for client in kept} == {"worker-0", "worker-1"}
            assert all(echoes(client) for client in kept)  # the served ones carry on
            server.wait_for_stderr(r"rejected 127\.0\.0\.1:\d+: over max-connections")
            leave(server, kept[:10])
            newcomers = [stack.enter_context(connect(server)) for _ in range(10)]
            assert [served(client) for client in newcomers] == [True] * 10
            with connect(server) as one_too_many:
                assert not served(one_too_many)
        assert server.stop() == 0


def test_max_per_ip_bounds_an_address_across_workers() -> None:
    with Server("--workers", "2", "--max-per-ip", "2", mode="workers") as server:
        with ExitStack() as stack:
            first = stack.enter_context(connect(server, "127.0.0.2"))
            assert served(first)
            # A second connection from the address, on the other worker: each worker then
            # holds one, under the limit of two if it counted alone.
            for _ in range(200):
                second = stack.enter_context(connect(server, "127.0.0.2"))
                assert served(second)
                if worker_of(server, second) != worker_of(server, first):
                    break
                leave(server, [second])
            else:
                pytest.fail("200 connections from one address all went to one worker")
            # Now both workers turn the address away.
            refused_by: set[str] = set()
            for _ in range(200):
                with connect(server, "127.0.0.2") as extra:
                    assert not served(extra)
                refused_by = set(
                    re.findall(
                        r"(worker-\d) echoplex\.server: rejected 127\.0\.0\.2:\d+: "
                        r"over max-per-ip",
                        server.stderr,
                    )
                )
                if len(refused_by) == 2:
                    break
            assert refused_by == {"worker-0", "worker-1"}
            with connect(server, "127.0.0.3") as other_address:
                assert served(other_address)
            assert served(first) and served(second)
        assert server.stop() == 0


@pytest.mark.timeout(120)
def test_a_killed_workers_slots_come_back_after_its_restart() -> None:
    args = ("--workers", "2", "--max-connections", "8", "--max-per-ip", "4")
    with Server(*args, "--log-level", "debug", mode="workers") as server:
        with ExitStack() as stack:
            held = {
                ip: [stack.enter_context(connect(server, ip)) for _ in range(4)]
                for ip in ("127.0.0.2", "127.0.0.3")
            }
            assert all(served(client) for clients in held.values() for client in clients)
            with connect(server, "127.0.0.4") as over_total:
                assert not served(over_total)
            victim = worker_of(server, held["127.0.0.2"][0])
            lost = {
                ip: [client for client in clients if worker_of(server, client) == victim]
                for ip, clients in held.items()
            }
            index = victim.removeprefix("worker-")
            pid = int(
                server.wait_for_stderr(rf"worker {index} \(pid (\d+)\) is listening").group(1)
            )
            os.kill(pid, signal.SIGKILL)
            exited = server.wait_for_stderr(rf"worker {index} \(pid {pid}\) exited")
            server.wait_for_stderr(
                rf"worker {index} \(pid \d+\) is listening",
                start=server.stderr_seen.index(exited.string),
            )
            for ip, clients in held.items():
                for client in clients:
                    assert served(client) == (client not in lost[ip])
            # Exactly what the dead worker held comes back, per address and in total.
            for ip, clients in lost.items():
                back = [stack.enter_context(connect(server, ip)) for _ in range(len(clients))]
                assert all(served(client) for client in back)
                with connect(server, ip) as one_more:
                    assert not served(one_more)
            with connect(server, "127.0.0.4") as still_over_total:
                assert not served(still_over_total)
        assert server.stop() == 0


def test_metrics_count_each_admission_and_rejection_once() -> None:
    args = ("--workers", "2", "--max-connections", "4", "--metrics-port", "0")
    with Server(*args, mode="workers") as server:
        with ExitStack() as stack:
            clients = [stack.enter_context(connect(server)) for _ in range(10)]
            assert [served(client) for client in clients].count(True) == 4

            def rejected() -> float:
                samples = scrape(server)
                return total(
                    samples, "echoplex_connections_rejected_total", reason="max-connections"
                )

            # A rejection is counted just after the client's connection is closed.
            wait_for(lambda: rejected() == 6, 10, lambda: f"6 rejections counted, not {rejected()}")
            samples = scrape(server)
            assert total(samples, "echoplex_connections_open") == 4
            assert total(samples, "echoplex_connections_accepted_total") == 4
        assert server.stop() == 0
