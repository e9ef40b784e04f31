"""`workers`: N processes, each running the `asyncio` model on its own listener.

Every worker binds the same port with `SO_REUSEPORT`, so the kernel spreads new
connections over the workers' accept queues (no shared accept lock, no thundering
herd). The parent only supervises: it restarts a worker that dies and, on a stop
request, passes it on to every worker and waits for them to drain. With port 0 the
parent first binds a non-listening placeholder to pick the port and keeps it for
the server's lifetime (`ServerPlan.reserved`), so restarted workers get the same one.

`--max-connections` and `--max-per-ip` bound the whole server, not each worker: the
workers count in one table the supervisor shares with them before forking
(`echoplex._shared_admission`), and a worker that dies gives back what it held
before its replacement starts.

Conditions changed while serving (the control API, in the supervisor) reach every
worker through a pipe of its own, read by a thread of the worker: each worker keeps
its own `LiveConditions`, drawn from its own stream (its index), so the processes'
draws differ. Each worker answers a change once it is in force, and the supervisor
waits up to `CHANGE_TIMEOUT_S` for every answer: the control API's reply then means
that every worker has the change (one that has not is logged). A worker started or
restarted later forks with the conditions then in force; one started during a change
hears of it through its pipe.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from .._net import Listeners, open_tcp_listeners
from .._shared_admission import AdmissionTable
from ..conditions import Conditions, LiveConditions
from ..errors import StartupError
from ..events import ServerEvents
from ..lifecycle import drain
from ..plan import ServerPlan
from ..shutdown import Shutdown, stop_on_signals
from . import asyncio_

log = logging.getLogger("echoplex.workers")

RUNS_EVENT_LOOP = True  # in each worker: the plan resolves the loop once, before forking
LISTENER_PER_PROCESS = True

# A worker that dies sooner than this after starting is restarted only after this long,
# so a worker that cannot start does not turn into a fork loop.
RESTART_BACKOFF_S = 1.0
# After the drain timeout, how long workers get to exit before they are killed.
EXIT_GRACE_S = 2.0
STARTUP_TIMEOUT_S = 30.0
ORPHAN_CHECK_S = 0.5
# How long the control API's answer waits for every worker to take a change (they take
# it within a millisecond or two; a worker this late is stuck, and is logged).
CHANGE_TIMEOUT_S = 2.0


class _ReadyReporter:
    """A worker's events: everything as the parent's, but `listening` tells the parent."""

    def __init__(self, events: ServerEvents, ready: Connection) -> None:
        self._events = events
        self._ready = ready

    def listening(self, addresses: list[Any]) -> None:
        self._ready.send(addresses)
        self._ready.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._events, name)


def _worker_main(
    index: int,
    plan: ServerPlan,
    events: ServerEvents,
    ready: Connection,
    table: AdmissionTable | None,
    changes: Connection,
) -> None:
    # Forked from the supervisor, we hold its signal handler and wakeup socket: until our
    # own are in place, SIGTERM ends this worker outright (it serves nobody yet).
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Ctrl-C in a terminal signals the whole process group, and the supervisor passes the
    # stop on as SIGTERM: a worker that heard both would take the second as "stop now"
    # and skip the drain. So a worker listens to its supervisor only.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    multiprocessing.current_process().name = f"worker-{index}"
    plan.conditions = LiveConditions(plan.conditions.current, stream=index)
    _follow_supervisor(changes, plan.conditions)
    admission = table.admission_for(index) if table is not None else plan.admission
    # The supervisor's own: the UDP echo (it serves UDP alone) and the port it holds.
    for sock in (*plan.udp_sockets, *plan.reserved):
        sock.close()
    shutdown = Shutdown()
    _stop_when_orphaned(shutdown)
    try:
        with stop_on_signals(shutdown, (signal.SIGTERM,)):
            # Its own TCP listeners on the plan's port, beside those the supervisor shares
            # (systemd's, the Unix socket: the supervisor alone removes the socket file).
            config = plan.config
            own = open_tcp_listeners(
                plan.per_process_hosts, plan.port, config.backlog, reuse_port=True
            )
            listeners = Listeners([*plan.listeners.sockets, *own])
            reporter = _ReadyReporter(events, ready)
            asyncio_.serve_on(listeners, plan, reporter, shutdown, admission)
    except StartupError as exc:
        log.error("%s", exc)
        os._exit(2)
    finally:
        shutdown.close()  # the orphan watch may still request(): that is harmless now


def _answered(pipe: Connection, number: int, deadline: float) -> bool:
    """Whether the worker at `pipe` says change `number` is in force by `deadline` (an
    answer to an earlier change, late, is passed over)."""
    try:
        while pipe.poll(max(0.0, deadline - time.monotonic())):
            if pipe.recv() == number:
                return True
    except (EOFError, OSError):  # it died: its replacement forks with the change
        pass
    return False


def _follow_supervisor(changes: Connection, live: LiveConditions) -> None:
    """Take each change of the conditions the supervisor sends, as it comes, and say
    so (its number) once it is in force."""

    def follow() -> None:
        with changes:
            while True:
                try:
                    number, named = changes.recv()
                    live.set(Conditions.from_mapping(named))
                    changes.send(number)
                except (EOFError, OSError):  # the supervisor is gone: the orphan watch acts
                    return

    threading.Thread(target=follow, name="conditions", daemon=True).start()


def _stop_when_orphaned(shutdown: Shutdown) -> None:
    """Drain and exit if the supervisor dies without stopping us (SIGKILL, a crash):
    a worker left behind would hold the port and serve on, unsupervised."""
    supervisor = os.getppid()

    def watch() -> None:
        while not shutdown.requested:
            if os.getppid() != supervisor:
                log.warning("supervisor %d is gone; stopping", supervisor)
                shutdown.request()
                return
            time.sleep(ORPHAN_CHECK_S)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


class _Supervisor:
    def __init__(
        self, plan: ServerPlan, events: ServerEvents, table: AdmissionTable | None = None
    ) -> None:
        self.plan = plan
        self.worker_count = plan.config.worker_count
        self.events = events
        self.table = table
        self.context = multiprocessing.get_context("fork")
        self.workers: dict[int, tuple[BaseProcess, float]] = {}
        # Ready pipes of workers that have not reported listening yet.
        self.starting: dict[Connection, int] = {}
        # Each worker's pipe for changes of the conditions; the lock orders a change
        # against a fork, so a new worker has a change either from its parent or by pipe.
        self.changes: dict[int, Connection] = {}
        self.changes_lock = threading.Lock()
        self.change_number = 0

    def start(self, index: int) -> None:
        parent_end, child_end = self.context.Pipe(duplex=False)
        changes_in, changes_out = self.context.Pipe()  # changes down, their numbers back
        process = self.context.Process(
            target=_worker_main,
            args=(index, self.plan, self.events, child_end, self.table, changes_in),
            name=f"worker-{index}",
            daemon=False,
        )
        with self.changes_lock:
            old = self.changes.pop(index, None)
            if old is not None:
                old.close()
            self.changes[index] = changes_out
            process.start()
        child_end.close()
        changes_in.close()
        self.workers[index] = (process, time.monotonic())
        self.starting[parent_end] = index

    def take_ready(self, conn: Connection) -> list[Any] | None:
        """Read a starting worker's ready message: its addresses, or None if it died first."""
        index = self.starting.pop(conn)
        try:
            addresses: list[Any] = conn.recv()
        except EOFError:
            return None
        finally:
            conn.close()
        log.debug("worker %d (pid %s) is listening", index, self.workers[index][0].pid)
        return addresses

    def start_all(self) -> list[Any]:
        for index in range(self.worker_count):
            self.start(index)
        addresses: list[Any] = []
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while self.starting:
            ready = wait(list(self.starting), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise StartupError("workers did not start in time")
            for conn in ready:
                assert isinstance(conn, Connection)
                index = self.starting[conn]
                started = self.take_ready(conn)
                if started is None:
                    raise StartupError(f"worker {index} exited during startup")
                addresses = started
        return addresses

    def supervise(self, shutdown: Shutdown) -> None:
        """Restart workers that die until a stop is requested."""
        while not shutdown.requested:
            sentinels = [process.sentinel for process, _ in self.workers.values()]
            for ready in wait([*sentinels, *self.starting, shutdown.fileno()]):
                if isinstance(ready, Connection):
                    self.take_ready(ready)
            shutdown.clear_wakeup()
            for index, (process, started_at) in list(self.workers.items()):
                if process.is_alive() or shutdown.requested:
                    continue
                process.join()
                # An optional event, as `starting` is: the metrics reporter forgets its gauges.
                worker_exited = getattr(self.events, "worker_exited", None)
                if worker_exited is not None:
                    worker_exited(process.pid or 0)
                if self.table is not None:
                    self.table.forget(index)  # before its replacement counts in that column
                log.warning(
                    "worker %d (pid %s) exited with status %s; restarting",
                    index,
                    process.pid,
                    process.exitcode,
                )
                if time.monotonic() - started_at < RESTART_BACKOFF_S:
                    shutdown.wait(RESTART_BACKOFF_S)
                    if shutdown.requested:
                        break
                self.start(index)

    def stop(self, shutdown: Shutdown) -> None:
        """The lifecycle's drain over the workers: pass the stop on (again, if forced),
        wait for them to exit until their drain deadline and `EXIT_GRACE_S` more, then
        kill what is left."""
        self.signal_all(signal.SIGTERM)  # each worker stops listening and drains
        forwarded_force = False
        drain_timeout_s = self.plan.drain_timeout_s
        # Not requested (a failed start): the workers were told just now.
        latest_drain_end = time.monotonic() + drain_timeout_s
        alive: list[BaseProcess] = []

        def count_alive() -> int:
            # One look per round at who is alive, and a wait on exactly those: a worker
            # that exits after the look has a readable sentinel, so the wait returns at
            # once. (Two looks, one to decide to wait and one to list what to wait on,
            # lost the workers that exited in between: their drains end together, so the
            # first exit woke us and the last one could go in that gap.)
            alive[:] = self.alive()
            return len(alive)

        def deadline() -> float:
            drain_end = min(shutdown.drain_deadline(drain_timeout_s), latest_drain_end)
            return drain_end + EXIT_GRACE_S

        def kill_the_rest() -> None:
            for process in alive:
                log.warning("worker %s did not exit in time; killing it", process.pid)
                process.kill()

        for wait_s in drain(count_alive, kill_the_rest, deadline, time.monotonic):
            if shutdown.forced and not forwarded_force:
                forwarded_force = True
                self.signal_all(signal.SIGTERM)
            wait([*(process.sentinel for process in alive), shutdown.fileno()], timeout=wait_s)
            shutdown.clear_wakeup()
        for process, _ in self.workers.values():
            process.join()
        for conn in self.starting:
            conn.close()

    def pass_on(self, conditions: Conditions) -> None:
        """Send a change of the conditions to every worker (the control API's follower),
        and wait, up to `CHANGE_TIMEOUT_S` in all, until each says it is in force."""
        named = conditions.to_mapping()
        with self.changes_lock:
            self.change_number += 1
            number = self.change_number
            sent = {}
            for index, pipe in self.changes.items():
                try:
                    pipe.send((number, named))
                    sent[index] = pipe
                except OSError as exc:  # it died: its replacement forks with the change
                    log.debug("worker %d did not take the conditions: %s", index, exc)
            deadline = time.monotonic() + CHANGE_TIMEOUT_S
            for index, pipe in sent.items():
                if not _answered(pipe, number, deadline):
                    log.warning(
                        "worker %d has not taken the change of conditions within %gs",
                        index,
                        CHANGE_TIMEOUT_S,
                    )

    def close_changes(self) -> None:
        with self.changes_lock:
            for pipe in self.changes.values():
                pipe.close()
            self.changes.clear()

    def alive(self) -> list[BaseProcess]:
        return [process for process, _ in self.workers.values() if process.is_alive()]

    def signal_all(self, sig: signal.Signals) -> None:
        for process in self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)  # type: ignore[arg-type]


def serve(plan: ServerPlan, events: ServerEvents, shutdown: Shutdown) -> None:
    table = AdmissionTable.from_config(plan.config)
    supervisor = _Supervisor(plan, events, table)
    # An optional event, as `worker_exited` is: the control API, when there is one, tells
    # the supervisor of each change (before listening is reported: none is missed).
    follow_conditions = getattr(events, "follow_conditions", None)
    if follow_conditions is not None:
        follow_conditions(supervisor.pass_on)
    try:
        events.listening(supervisor.start_all())
        log.info("%d workers running", supervisor.worker_count)
        supervisor.supervise(shutdown)
        events.stopping()
    finally:
        supervisor.stop(shutdown)
        supervisor.close_changes()
        if table is not None:
            table.close()
