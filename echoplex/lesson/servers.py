"""A real server for one scene of the lesson: `echoplex serve`, its own process, on a
free port.

The server is `python -m echoplex serve --log-format json`, the command a learner runs,
not a copy of it: the lesson reads the port from its `listening` line and when it
accepted each client from its `open` lines (`timestamp`, the wall clock to the
millisecond, and `peer`, whose port is the client's own). It runs as a process of its
own, not in a thread of the lesson, for two reasons the lesson is about: work that
computes holds the GIL, and a server in the lesson's process would take turns with the
lesson's clients; and memory and threads per connection are read from the server's
process alone. It is started in a session of its own, so that stopping it (or a
Ctrl-C) ends the workers of the `workers` model too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Self

from ..bench import proctree

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


def stop_every_server() -> None:
    """Stop every server still running (a Ctrl-C may come before its step holds it)."""
    for server in list(_running):
        server.stop()


class ServerFailed(Exception):
    """The server did not start, or stopped before its time: one line, the reason."""


SERVE = ["-m", "echoplex", "serve", "--port", "0", "--log-format", "json", "--log-level", "info"]


class LessonServer:
    """`python -m echoplex serve --port 0 ARGS`, its port and when it accepted each client."""

    def __init__(self, args: Sequence[str]) -> None:
        self.args = list(args)
        self.port: int | None = None
        self.accepted: dict[int, tuple[float, str]] = {}  # the client's port: when
        # (time.time()) and which process (`workers` has one per CPU) accepted it
        self._changed = threading.Condition()
        self._stderr: list[str] = []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
        argv = [sys.executable, *SERVE, *self.args]
        # No Ctrl-C between the fork and noting the server as running: it would leave
        # a server that nothing stops. (The server inherits the mask: it is stopped by
        # SIGTERM, in a session of its own that a terminal's Ctrl-C does not reach.)
        main = threading.current_thread() is threading.main_thread()
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            _running.add(self)
        finally:
            if main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> tuple[str, int]:
        assert self.port is not None
        return ("127.0.0.1", self.port)

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").strip()
            with self._changed:
                self._note(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _note(self, line: str) -> None:
        """One line of the server's log: its port, an accept, or what went wrong."""
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            self._stderr.append(line)  # a startup error is one plain line
            return
        event, peer = entry.get("event"), str(entry.get("peer", ""))
        if event == "listening" and self.port is None:
            self.port = int(str(entry["address"]).rpartition(":")[2])
        elif event == "open" and peer.rpartition(":")[2].isdigit():
            when = datetime.fromisoformat(str(entry["timestamp"])).timestamp()
            process = str(entry.get("process", ""))
            self.accepted[int(peer.rpartition(":")[2])] = (when, process)
        elif entry.get("level") in ("warning", "error", "critical"):
            self._stderr.append(str(entry.get("message", line)))

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Block until `ready()` is true; ServerFailed if the server ends or time runs out."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not ready():
                if self.proc.poll() is not None:
                    raise ServerFailed(f"the server stopped before {what}: {self.last_error()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerFailed(f"no {what} within {timeout_s:g} s")
                self._changed.wait(min(left, 0.2))

    def wait_listening(self) -> Self:
        self.wait_until(lambda: self.port is not None, STARTUP_TIMEOUT_S, "listening")
        return self

    def accepted_count(self) -> int:
        return len(self.accepted)

    def last_error(self) -> str:
        return self._stderr[-1] if self._stderr else f"exit status {self.proc.poll()}"

    def threads(self) -> int | None:
        """Threads of every process of the server (a `workers` supervisor's too)."""
        counts = []
        for pid in proctree.tree_pids(self.pid):
            try:
                counts.append(len(os.listdir(f"/proc/{pid}/task")))
            except OSError:
                continue  # gone
        return sum(counts) if counts else None

    def cpu_s(self) -> float | None:
        """CPU time (user and system) of every process of the server so far."""
        return proctree.tree_cpu_s(self.pid)

    def rss_bytes(self) -> int | None:
        return proctree.tree_rss_bytes(self.pid)

    def stop(self) -> None:
        """SIGTERM to the whole session, SIGKILL if it lingers; reaped either way."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        _running.discard(self)
        self._reader.join(STOP_TIMEOUT_S)

    def __enter__(self) -> Self:
        try:
            return self.wait_listening()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_running: set[LessonServer] = set()  # started and not yet stopped
