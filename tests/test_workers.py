"""The `workers` model's supervision: worker processes, restarts, no worker left behind."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from .procs import Server
from .test_contract import recv_exactly
from .waiting import wait_for


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(text) for text in path.read_text().split()}


def echo_once(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        return recv_exactly(sock, len(data))


def test_a_dead_worker_is_restarted_and_none_is_left_behind() -> None:
    with Server("--workers", "2", "--log-level", "debug", mode="workers") as server:
        workers = children(server.proc.pid)
        assert len(workers) == 2
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        server.wait_for_stderr(rf"worker \d \(pid {victim}\) exited .*restarting")
        restarted_from = len(server.stderr_seen) - 1
        server.wait_for_stderr(r"worker \d \(pid \d+\) is listening", start=restarted_from)
        after = children(server.proc.pid)
        assert len(after) == 2 and victim not in after
        for _ in range(10):
            assert echo_once(server.address, b"still serving") == b"still serving"
        assert server.stop() == 0
        for pid in after:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
            )


def test_workers_stop_when_the_supervisor_is_killed() -> None:
    with Server("--workers", "2", mode="workers") as server:
        workers = children(server.proc.pid)
        os.kill(server.proc.pid, signal.SIGKILL)
        wait_for(
            lambda: not any(alive(pid) for pid in workers),
            15,
            lambda: f"workers {[pid for pid in workers if alive(pid)]} gone",
        )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")
