"""The `workers` supervisor's stop, with stand-in workers: no processes, no sockets.

The race it pins down is between the supervisor's looks at its workers, which real
processes hit only now and then (2 runs in 14 under load), so the stand-in makes it
happen every time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from echoplex import QuietEvents, ServerConfig, Shutdown
from echoplex.models.workers import _Supervisor
from echoplex.plan import load_model, resolve

# No process has a pid above pid_max, so signalling this one is a harmless ESRCH.
NO_SUCH_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


class ExitsBetweenLooks:
    """A worker that is alive at the supervisor's first `looks` checks and gone after:
    it exits while the supervisor is between one look and the next."""

    def __init__(self, looks: int) -> None:
        read_end, write_end = os.pipe()
        os.close(write_end)  # a process's sentinel reads EOF once the process is gone
        self.sentinel = read_end
        self.looks_left = looks
        self.pid = NO_SUCH_PID
        self.killed = False

    def is_alive(self) -> bool:
        self.looks_left -= 1
        return self.looks_left >= 0

    def kill(self) -> None:
        self.killed = True

    def join(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.sentinel)


@pytest.mark.timeout(30)
def test_stop_returns_as_soon_as_the_last_worker_is_gone() -> None:
    # A drain timeout of an hour: a stop that waits for the grace instead of the worker
    # runs into the test's watchdog. Before the fix it looked once to decide to wait and
    # again to list what to wait on; the worker exited in between, and it waited on the
    # shutdown socket alone until the grace ran out.
    config = ServerConfig(mode="workers", port=0, drain_timeout_s=3600.0)
    plan = resolve(config, load_model(config.mode))
    supervisor = _Supervisor(plan, QuietEvents())
    # Looks: signalling the workers, deciding to wait; gone from the next look on.
    worker = ExitsBetweenLooks(looks=2)
    supervisor.workers[0] = (worker, 0.0)  # type: ignore[assignment]
    shutdown = Shutdown()
    try:
        shutdown.request()
        shutdown.clear_wakeup()  # as `supervise` does when the request wakes it
        supervisor.stop(shutdown)
        assert not worker.killed
    finally:
        shutdown.close()
        worker.close()
        plan.close()
